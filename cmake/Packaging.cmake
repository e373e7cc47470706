# What `cmake --install` places beside the binaries, and `cpack -G DEB`: one package per part.
#   taskmaster         the master, its unit, /etc/taskmaster/master.toml
#   taskmaster-worker  the worker, its template unit, /etc/taskmaster/worker.toml
#   taskmaster-client  taskctl
#   taskmaster-dev     the worker SDK: header, static libraries, CMake package
# The component names (master, worker, client, sdk) are those of the install() rules.

set(TASKMASTER_SYSTEMD_UNIT_DIR "lib/systemd/system" CACHE STRING
  "Where the systemd units go, under the prefix (or an absolute path)")
set(TM_DEPLOY ${PROJECT_SOURCE_DIR}/deploy)
# /etc/taskmaster for the prefix /usr (the packages' prefix, set only when cpack installs), else
# PREFIX/etc/taskmaster: decided at install time, as GNUInstallDirs does at configure time.
foreach(component master worker)
  install(CODE [[
    if(CMAKE_INSTALL_PREFIX STREQUAL "/usr")
      set(TM_ETC etc/taskmaster)
    else()
      string(REGEX REPLACE "^/+" "" TM_ETC "${CMAKE_INSTALL_PREFIX}/etc/taskmaster")
    endif()
  ]] COMPONENT ${component})
endforeach()
# Absolute to CMake (which would put the prefix before it): "/" and the path set above, at install
# time.
set(TM_ETC "/\${TM_ETC}")

set(TM_UNITS taskmaster.service master taskworker@.service worker)
while(TM_UNITS)
  list(POP_FRONT TM_UNITS unit component)
  install(CODE "set(TM_UNIT_SOURCE \"${TM_DEPLOY}/systemd/${unit}\")
    set(TM_UNIT_DIR \"${TASKMASTER_SYSTEMD_UNIT_DIR}\")
    include(\"${PROJECT_SOURCE_DIR}/cmake/InstallUnit.cmake\")" COMPONENT ${component})
endwhile()
install(FILES ${TM_DEPLOY}/master.example.toml DESTINATION ${TM_ETC} RENAME master.toml
  COMPONENT master)
install(FILES ${TM_DEPLOY}/worker.toml DESTINATION ${TM_ETC} COMPONENT worker)

# Each package's /usr/share/doc/PACKAGE: the copyright and changelog Debian asks for, and the
# README and example configs the units and config files point to.
set(TM_PACKAGES master taskmaster worker taskmaster-worker client taskmaster-client
  sdk taskmaster-dev)
# Made when configuring, not by a build target: an install of any component, after a build of
# only some targets, finds it.
configure_file(${TM_DEPLOY}/debian/changelog ${CMAKE_CURRENT_BINARY_DIR}/debian/changelog @ONLY)
set(TM_CHANGELOG_GZ ${CMAKE_CURRENT_BINARY_DIR}/debian/changelog.Debian.gz)
execute_process(COMMAND gzip -9nc ${CMAKE_CURRENT_BINARY_DIR}/debian/changelog
  OUTPUT_FILE ${TM_CHANGELOG_GZ} COMMAND_ERROR_IS_FATAL ANY)
while(TM_PACKAGES)
  list(POP_FRONT TM_PACKAGES component package)
  set(doc ${CMAKE_INSTALL_DATAROOTDIR}/doc/${package})
  install(FILES ${TM_DEPLOY}/debian/copyright ${TM_CHANGELOG_GZ} DESTINATION ${doc}
    COMPONENT ${component})
  string(TOUPPER ${component} COMPONENT)
  set(CPACK_DEBIAN_${COMPONENT}_PACKAGE_NAME ${package})
endwhile()
install(FILES README.md ${TM_DEPLOY}/master.example.toml
  DESTINATION ${CMAKE_INSTALL_DATAROOTDIR}/doc/taskmaster COMPONENT master)
install(FILES README.md ${TM_DEPLOY}/worker.example.toml
  DESTINATION ${CMAKE_INSTALL_DATAROOTDIR}/doc/taskmaster-worker COMPONENT worker)

set(CPACK_PACKAGE_NAME taskmaster)
set(CPACK_PACKAGE_VENDOR "The taskmaster developers")
set(CPACK_PACKAGE_CONTACT "The taskmaster developers <taskmaster@example.org>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "distributed task queue")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
set(CPACK_COMPONENTS_ALL master worker client sdk)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_RELEASE 1)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)  # Depends: from the libraries the binaries link
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_SECTION net)

# Debian's descriptions: a summary line, then lines of at most 79 characters, each after a space.
set(CPACK_COMPONENT_MASTER_DESCRIPTION "distributed task queue: the master daemon
 taskmaster holds named task queues and their results, durably, and serves
 them over authenticated gRPC to workers on any number of hosts and to clients.
 This package has the master, its systemd unit (taskmaster.service) and
 /etc/taskmaster/master.toml.")
set(CPACK_COMPONENT_WORKER_DESCRIPTION "distributed task queue: the worker daemon
 taskworker pulls tasks from a taskmaster master, runs them on local thread
 pools (built-in kinds, commands, plugins) and pushes results back. This
 package has the worker, its systemd template unit (taskworker@.service) and
 /etc/taskmaster/worker.toml.")
set(CPACK_COMPONENT_CLIENT_DESCRIPTION "distributed task queue: the command-line client
 taskctl submits tasks and jobs to a taskmaster master, follows them, and shows
 queues, workers and results.")
set(CPACK_COMPONENT_SDK_DESCRIPTION "distributed task queue: worker SDK
 The header, static libraries and CMake package (find_package(taskmaster)) for
 building taskmaster workers and plugins of your own in C++.")

set(CPACK_DEBIAN_MASTER_PACKAGE_DEPENDS "adduser")
set(CPACK_DEBIAN_WORKER_PACKAGE_DEPENDS "adduser")
# Maintainer scripts: postinst makes the system user (the master's also a first set of tokens)
# and reloads systemd (restarting what ran, on upgrade), prerm stops the units on removal, postrm
# removes what postinst made on purge; conffiles keeps an edited /etc/taskmaster file across
# upgrades.
foreach(component master worker)
  string(TOUPPER ${component} COMPONENT)
  set(extra)
  foreach(file postinst prerm postrm conffiles)
    list(APPEND extra ${TM_DEPLOY}/debian/${component}/${file})
  endforeach()
  set(CPACK_DEBIAN_${COMPONENT}_PACKAGE_CONTROL_EXTRA "${extra}")
endforeach()
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
set(CPACK_DEBIAN_SDK_PACKAGE_SECTION libdevel)
set(CPACK_DEBIAN_SDK_PACKAGE_DEPENDS "libgrpc++-dev, libprotobuf-dev, protobuf-compiler, \
libabsl-dev, libspdlog-dev, libtomlplusplus-dev, libsystemd-dev, libssl-dev, prometheus-cpp-dev, \
cmake")

include(CPack)
