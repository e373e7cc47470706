# Run by `cmake --install` (see Packaging.cmake): installs the unit TM_UNIT_SOURCE into
# TM_UNIT_DIR (under the prefix unless absolute). The units name the packages' paths
# (/usr/bin, /etc/taskmaster, /usr/share/doc); under another prefix they are rewritten to
# name what that install placed, so an installed unit starts what was installed with it.
file(READ "${TM_UNIT_SOURCE}" unit)
if(NOT CMAKE_INSTALL_PREFIX STREQUAL "/usr")
  string(REPLACE "/usr/bin/" "${CMAKE_INSTALL_PREFIX}/bin/" unit "${unit}")
  string(REPLACE "/usr/share/doc/" "${CMAKE_INSTALL_PREFIX}/share/doc/" unit "${unit}")
  string(REPLACE "/etc/taskmaster/" "/${TM_ETC}/" unit "${unit}")
endif()
if(IS_ABSOLUTE "${TM_UNIT_DIR}")
  set(dir "${TM_UNIT_DIR}")
else()
  set(dir "${CMAKE_INSTALL_PREFIX}/${TM_UNIT_DIR}")
endif()
get_filename_component(name "${TM_UNIT_SOURCE}" NAME)
message(STATUS "Installing: $ENV{DESTDIR}${dir}/${name}")
file(WRITE "$ENV{DESTDIR}${dir}/${name}" "${unit}")
list(APPEND CMAKE_INSTALL_MANIFEST_FILES "${dir}/${name}")
