#include "master/rpc/tls.h"

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <ctime>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/util.h"

namespace taskmaster {
namespace {

using X509Ptr = std::unique_ptr<X509, decltype(&X509_free)>;
using KeyPtr = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;

// The certificates of a PEM text, in order; none when it holds none.
std::vector<X509Ptr> ReadCertificates(const std::string& pem) {
  std::vector<X509Ptr> out;
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), BIO_free);
  while (bio) {
    X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
    if (!cert) break;
    out.emplace_back(cert, X509_free);
  }
  ERR_clear_error();  // the read that ended the loop
  return out;
}

std::string Subject(X509* cert) {
  char buf[256];
  X509_NAME_oneline(X509_get_subject_name(cert), buf, sizeof buf);
  return buf;
}

std::string Utc(time_t t) {
  char buf[32];
  tm parts{};
  gmtime_r(&t, &parts);
  strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &parts);
  return buf;
}

time_t ToTime(const ASN1_TIME* when) {
  tm parts{};
  ASN1_TIME_to_tm(when, &parts);
  return timegm(&parts);
}

// "" when `cert` is valid at `now`, else why not.
std::string Validity(X509* cert, time_t now) {
  const time_t not_before = ToTime(X509_get0_notBefore(cert));
  const time_t not_after = ToTime(X509_get0_notAfter(cert));
  if (now < not_before) return absl::StrCat("is not valid before ", Utc(not_before));
  if (now > not_after) return absl::StrCat("expired on ", Utc(not_after));
  return "";
}

}  // namespace

absl::StatusOr<TlsMaterial> LoadTlsMaterial(const TlsFiles& files,
                                            std::chrono::system_clock::time_point now) {
  const time_t at = std::chrono::system_clock::to_time_t(now);
  TlsMaterial m;
  for (auto [path, text] : {std::pair{&files.cert_file, &m.cert},
                            {&files.key_file, &m.key},
                            {&files.client_ca_file, &m.client_ca}}) {
    if (path->empty()) continue;
    absl::StatusOr<std::string> read = ReadWholeFile(*path);
    if (!read.ok()) return read.status();
    *text = std::move(*read);
  }
  auto refuse = [](const std::string& path, auto&&... why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", why...));
  };
  std::vector<X509Ptr> chain = ReadCertificates(m.cert);
  if (chain.empty()) return refuse(files.cert_file, "holds no PEM certificate");
  for (const X509Ptr& cert : chain) {
    if (std::string why = Validity(cert.get(), at); !why.empty()) {
      return refuse(files.cert_file, "the certificate '", Subject(cert.get()), "' ", why,
                    ": make a new one (deploy/make-certs.sh does)");
    }
  }
  m.subject = Subject(chain[0].get());
  m.not_after = std::chrono::system_clock::from_time_t(ToTime(X509_get0_notAfter(chain[0].get())));

  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(m.key.data(), static_cast<int>(m.key.size())), BIO_free);
  KeyPtr key(bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr) : nullptr,
             EVP_PKEY_free);
  ERR_clear_error();
  if (!key) return refuse(files.key_file, "holds no PEM private key (or one under a passphrase)");
  if (X509_check_private_key(chain[0].get(), key.get()) != 1) {
    ERR_clear_error();
    return refuse(files.key_file, "this key does not belong to the certificate in ",
                  files.cert_file);
  }

  if (!files.client_ca_file.empty()) {
    std::vector<X509Ptr> cas = ReadCertificates(m.client_ca);
    if (cas.empty()) return refuse(files.client_ca_file, "holds no PEM certificate");
    bool any_valid = false;
    for (const X509Ptr& ca : cas) any_valid |= Validity(ca.get(), at).empty();
    if (!any_valid) {
      return refuse(files.client_ca_file, "every CA certificate in it is expired or not yet valid",
                    " (first: '", Subject(cas[0].get()), "' ", Validity(cas[0].get(), at), ")");
    }
  }
  return m;
}

ReloadableServerCredentials::ReloadableServerCredentials(TlsMaterial material)
    : require_client_cert_(!material.client_ca.empty()), material_(std::move(material)) {}

ReloadableServerCredentials::~ReloadableServerCredentials() = default;

void ReloadableServerCredentials::Replace(TlsMaterial material) {
  absl::MutexLock lock(&mu_);
  material_ = std::move(material);
  ++generation_;
}

grpc_ssl_certificate_config_reload_status ReloadableServerCredentials::Fetch(
    void* self, grpc_ssl_server_certificate_config** config) {
  auto* creds = static_cast<ReloadableServerCredentials*>(self);
  absl::MutexLock lock(&creds->mu_);
  if (creds->served_ == creds->generation_) return GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_UNCHANGED;
  const grpc_ssl_pem_key_cert_pair pair{creds->material_.key.c_str(),
                                        creds->material_.cert.c_str()};
  // gRPC copies the strings and takes the config. It wants roots even when it asks for no
  // client certificate, and then never uses them.
  *config = grpc_ssl_server_certificate_config_create(creds->require_client_cert_
                                                          ? creds->material_.client_ca.c_str()
                                                          : creds->material_.cert.c_str(),
                                                      &pair, 1);
  creds->served_ = creds->generation_;
  return GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_NEW;
}

int ReloadableServerCredentials::AddPortToServer(const std::string& addr, grpc_server* server) {
  grpc_ssl_server_credentials_options* options =
      grpc_ssl_server_credentials_create_options_using_config_fetcher(
          require_client_cert_ ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                               : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
          &ReloadableServerCredentials::Fetch, this);
  grpc_server_credentials* creds = grpc_ssl_server_credentials_create_with_options(options);
  const int port = grpc_server_add_http2_port(server, addr.c_str(), creds);
  grpc_server_credentials_release(creds);
  return port;
}

}  // namespace taskmaster
