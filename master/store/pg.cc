// The libpq layer of the PostgreSQL store (see pg.h).
#include "master/store/pg.h"

#include <endian.h>

#include <cstring>
#include <functional>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace taskmaster::pg {
namespace {

template <typename T>
void Append(std::string& out, T v) {
  char raw[sizeof(T)];
  std::memcpy(raw, &v, sizeof(T));
  out.append(raw, sizeof(T));
}

// `message` without the newline and spaces libpq ends it with.
std::string Trimmed(std::string message) {
  return std::string(absl::StripTrailingAsciiWhitespace(message));
}

// The parameters as libpq takes them: pointers into `params`, which must outlive the call.
std::vector<const char*> Pointers(const Params& params) {
  std::vector<const char*> out;
  out.reserve(params.size());
  for (const auto& p : params) out.push_back(p ? p->c_str() : nullptr);
  return out;
}

}  // namespace

int64_t Result::int64(int row, int col) const {
  const std::string_view b = bytes(row, col);
  if (b.size() == 8) {
    uint64_t v;
    std::memcpy(&v, b.data(), 8);
    return static_cast<int64_t>(be64toh(v));
  }
  if (b.size() == 4) {
    uint32_t v;
    std::memcpy(&v, b.data(), 4);
    return static_cast<int32_t>(be32toh(v));
  }
  if (b.size() == 2) {
    uint16_t v;
    std::memcpy(&v, b.data(), 2);
    return static_cast<int16_t>(be16toh(v));
  }
  return 0;  // NULL
}

void ArrayParam::Int64(int64_t v) {
  ++count_;
  Append(elements_, htobe32(8));
  Append(elements_, htobe64(static_cast<uint64_t>(v)));
}

void ArrayParam::Bytes(std::string_view v) {
  ++count_;
  Append(elements_, htobe32(static_cast<uint32_t>(v.size())));
  elements_.append(v);
}

// A record element: its length, then the field count and the fields.
void ArrayParam::Add(const Record& row) {
  ++count_;
  Append(elements_, htobe32(static_cast<uint32_t>(4 + row.fields_.size())));
  Append(elements_, htobe32(row.count_));
  elements_ += row.fields_;
}

Record::Scalars Record::AsScalars() const {
  // fields_ holds what Fixed and Variable wrote: a type, a length, the bytes, and again.
  auto read32 = [this](size_t at) {
    uint32_t v;
    std::memcpy(&v, fields_.data() + at, 4);
    return be32toh(v);
  };
  Scalars out{"(", {}};
  size_t at = 0;
  for (uint32_t i = 0; i < count_; ++i) {
    const uint32_t oid = read32(at), length = read32(at + 4);
    const char* type = oid == ArrayParam::kBool    ? "bool"
                       : oid == ArrayParam::kBytea ? "bytea"
                       : oid == ArrayParam::kInt8  ? "int8"
                       : oid == ArrayParam::kInt2  ? "int2"
                       : oid == ArrayParam::kInt4  ? "int4"
                                                   : "text";
    absl::StrAppend(&out.sql, i == 0 ? "" : ", ", "$", i + 1, "::", type);
    out.values.push_back(fields_.substr(at + 8, length));
    at += 8 + length;
  }
  out.sql += ")";
  return out;
}

template <typename T>
Record& Record::Fixed(uint32_t oid, T v) {
  ++count_;
  Append(fields_, htobe32(oid));
  Append(fields_, htobe32(sizeof(T)));
  Append(fields_, v);
  return *this;
}

Record& Record::Variable(uint32_t oid, std::string_view v) {
  ++count_;
  Append(fields_, htobe32(oid));
  Append(fields_, htobe32(static_cast<uint32_t>(v.size())));
  fields_.append(v);
  return *this;
}

Record& Record::Int16(int16_t v) {
  return Fixed(ArrayParam::kInt2, htobe16(static_cast<uint16_t>(v)));
}
Record& Record::Int32(int32_t v) {
  return Fixed(ArrayParam::kInt4, htobe32(static_cast<uint32_t>(v)));
}
Record& Record::Int64(int64_t v) {
  return Fixed(ArrayParam::kInt8, htobe64(static_cast<uint64_t>(v)));
}
Record& Record::Bool(bool v) { return Fixed(ArrayParam::kBool, static_cast<uint8_t>(v ? 1 : 0)); }
Record& Record::Text(std::string_view v) { return Variable(ArrayParam::kText, v); }
Record& Record::Bytea(std::string_view v) { return Variable(ArrayParam::kBytea, v); }

std::string ArrayParam::Encode() const {
  std::string out;
  out.reserve(20 + elements_.size());
  Append(out, htobe32(1));  // dimensions
  Append(out, htobe32(0));  // no NULLs
  Append(out, htobe32(oid_));
  Append(out, htobe32(static_cast<uint32_t>(count_)));
  Append(out, htobe32(1));  // lower bound
  out += elements_;
  return out;
}

absl::StatusOr<std::unique_ptr<Connection>> Connection::Open(const std::string& conninfo,
                                                             const std::string& password,
                                                             const std::string& application_name,
                                                             std::chrono::milliseconds timeout) {
  const std::string seconds = std::to_string(std::max<int64_t>(1, (timeout.count() + 999) / 1000));
  // A server that stops answering (a partition, a dead host) fails the connection within the
  // timeout, rather than after TCP's own minutes: unacknowledged data (tcp_user_timeout), and an
  // idle connection (keepalives).
  const std::string user_timeout = std::to_string(std::max<int64_t>(1'000, timeout.count()));
  std::vector<const char*> keys = {"dbname",           "connect_timeout", "application_name",
                                   "keepalives",       "keepalives_idle", "keepalives_interval",
                                   "keepalives_count", "tcp_user_timeout"};
  std::vector<const char*> values = {conninfo.c_str(),
                                     seconds.c_str(),
                                     application_name.c_str(),
                                     "1",
                                     seconds.c_str(),
                                     "1",
                                     "3",
                                     user_timeout.c_str()};
  if (!password.empty()) {
    keys.push_back("password");
    values.push_back(password.c_str());
  }
  keys.push_back(nullptr);
  values.push_back(nullptr);
  // expand_dbname: `dbname` holds the whole connection string; the keys after it fill in what
  // it leaves out, and the password replaces one libpq would look up.
  PGconn* conn = PQconnectdbParams(keys.data(), values.data(), /*expand_dbname=*/1);
  auto owned = std::unique_ptr<Connection>(new Connection(conn));
  // The server's notices ("already exists, skipping") are for a person at psql, not our log.
  PQsetNoticeProcessor(
      conn,
      [](void*, const char* message) { GetLogger("store")->debug("PostgreSQL: {}", message); },
      nullptr);
  if (PQstatus(conn) != CONNECTION_OK) {
    return absl::UnavailableError(absl::StrCat("cannot connect to PostgreSQL (", Redacted(conninfo),
                                               "): ", PQerrorMessage(conn)));
  }
  return owned;
}

Connection::~Connection() { PQfinish(conn_); }

absl::Status Connection::ConnectionError(std::string_view doing) {
  return absl::UnavailableError(
      absl::StrCat("PostgreSQL, ", std::string(doing), ": ", Trimmed(PQerrorMessage(conn_))));
}

absl::Status Connection::ResultError(PGresult* r, std::string_view doing,
                                     const std::map<std::string, absl::StatusCode>& error_codes) {
  if (PQstatus(conn_) != CONNECTION_OK || !r) return ConnectionError(doing);
  // The server's own words, without its "ERROR:" prefix and the context lines after them.
  const char* primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
  const std::string message = Trimmed(primary ? primary : PQresultErrorMessage(r));
  const char* state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
  // Class 08 (connection exception), 57P (operator intervention: a shutdown, a terminated
  // backend), 40 (a serialization failure or deadlock), 53 (insufficient resources: a full disk,
  // too many connections): worth trying again.
  const std::string_view code = state ? state : "";
  if (auto own = error_codes.find(std::string(code)); own != error_codes.end()) {
    return absl::Status(own->second, message);
  }
  const bool transient = code.starts_with("08") || code.starts_with("57P") ||
                         code.starts_with("40") || code.starts_with("53");
  std::string text = absl::StrCat("PostgreSQL, ", std::string(doing), ": ", message);
  return transient ? absl::UnavailableError(text) : absl::FailedPreconditionError(text);
}

absl::StatusOr<Result> Connection::Exec(const std::string& sql, const Params& params) {
  const std::vector<const char*> values = Pointers(params);
  PGresult* r = params.empty() && sql.find(';') != std::string::npos
                    ? PQexec(conn_, sql.c_str())
                    : PQexecParams(conn_, sql.c_str(), static_cast<int>(values.size()), nullptr,
                                   values.data(), nullptr, nullptr, /*resultFormat=*/1);
  const ExecStatusType s = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
  if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
    absl::Status error = ResultError(r, sql.substr(0, sql.find_first_of(" (")));
    PQclear(r);
    return error;
  }
  return Result(r);
}

absl::Status Connection::Run(const std::string& sql, const Params& params) {
  return Exec(sql, params).status();
}

absl::Status Connection::Transaction(const std::vector<Statement>& statements,
                                     const std::map<std::string, absl::StatusCode>& error_codes) {
  if (PQenterPipelineMode(conn_) != 1) return ConnectionError("entering pipeline mode");
  absl::Status status;
  // What the server answers, in order: a prepare (nullptr) or a statement's execution.
  std::vector<const Statement*> answers;
  for (const Statement& st : statements) {
    // Each statement is parsed and planned once per connection, then only executed.
    auto [named, unprepared] = prepared_.try_emplace(st.sql, "");
    if (unprepared) {
      named->second = absl::StrCat("tm", ++statements_prepared_);
      if (PQsendPrepare(conn_, named->second.c_str(), st.sql.c_str(),
                        static_cast<int>(st.params.size()), nullptr) != 1) {
        status = ConnectionError("preparing a statement");
        break;
      }
      answers.push_back(nullptr);
    }
    std::vector<const char*> values;
    std::vector<int> lengths;
    const std::vector<int> formats(st.params.size(), st.binary ? 1 : 0);
    for (const std::string& p : st.params) {
      values.push_back(p.c_str());
      lengths.push_back(static_cast<int>(p.size()));
    }
    if (PQsendQueryPrepared(conn_, named->second.c_str(), static_cast<int>(st.params.size()),
                            values.data(), lengths.data(), formats.data(), 1) != 1) {
      status = ConnectionError("sending a statement");
      break;
    }
    answers.push_back(&st);
  }
  // Statements up to the sync are one transaction: committed there, or rolled back at an error.
  if (status.ok() && PQpipelineSync(conn_) != 1) status = ConnectionError("a pipeline sync");
  if (!status.ok()) {
    PQexitPipelineMode(conn_);
    prepared_.clear();  // which were prepared is unknown now: the connection is dropped anyway
    return status;
  }
  // One result and a null per answer, then the sync's.
  for (const Statement* st : answers) {
    PGresult* r = PQgetResult(conn_);
    if (!r) {
      status = ConnectionError("reading a result");
      break;
    }
    const ExecStatusType s = PQresultStatus(r);
    if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK && s != PGRES_PIPELINE_ABORTED &&
        status.ok()) {
      status = st ? ResultError(r, st->sql.substr(0, st->sql.find_first_of(" (")), error_codes)
                  : ResultError(r, "preparing a statement");
    }
    PQclear(r);
    while ((r = PQgetResult(conn_)) != nullptr) PQclear(r);
  }
  if (status.ok() || PQstatus(conn_) == CONNECTION_OK) {
    PGresult* sync = PQgetResult(conn_);
    if (!sync || PQresultStatus(sync) != PGRES_PIPELINE_SYNC) {
      if (status.ok()) status = ConnectionError("the commit");
    }
    PQclear(sync);
  }
  if (PQexitPipelineMode(conn_) != 1 && status.ok()) status = ConnectionError("the commit");
  // A prepare after the failing statement was skipped: forget them all, and prepare afresh
  // under new names (a name that was prepared stays taken).
  if (!status.ok()) prepared_.clear();
  return status;
}

absl::Status Connection::ForEachRow(const std::string& sql, const Params& params,
                                    const std::function<absl::Status(const Result&)>& row) {
  const std::vector<const char*> values = Pointers(params);
  if (PQsendQueryParams(conn_, sql.c_str(), static_cast<int>(values.size()), nullptr, values.data(),
                        nullptr, nullptr, /*resultFormat=*/1) != 1 ||
      PQsetSingleRowMode(conn_) != 1) {
    return ConnectionError("a query");
  }
  absl::Status status;
  PGresult* r;
  while ((r = PQgetResult(conn_)) != nullptr) {
    Result owned(r);
    const ExecStatusType s = PQresultStatus(r);
    if (s == PGRES_SINGLE_TUPLE) {
      if (status.ok()) status = row(owned);  // after an error, the rest is only drained
    } else if (s != PGRES_TUPLES_OK && status.ok()) {
      status = ResultError(r, "a query");
    }
  }
  return status;
}

std::string Redacted(const std::string& conninfo) {
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(conninfo.c_str(), &error);
  if (!options) {
    PQfreemem(error);
    return "an unreadable connection string";
  }
  std::string out;
  for (PQconninfoOption* o = options; o->keyword; ++o) {
    if (!o->val || std::strcmp(o->keyword, "password") == 0) continue;
    absl::StrAppend(&out, out.empty() ? "" : " ", o->keyword, "=", o->val);
  }
  PQconninfoFree(options);
  return out;
}

absl::Status RefusePasswordIn(const std::string& conninfo) {
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(conninfo.c_str(), &error);
  if (!options) {
    const std::string message = Trimmed(error ? error : "unreadable");
    PQfreemem(error);
    return absl::InvalidArgumentError(absl::StrCat("--postgres: ", message));
  }
  bool has_password = false;
  for (PQconninfoOption* o = options; o->keyword; ++o) {
    if (std::strcmp(o->keyword, "password") == 0 && o->val && *o->val) has_password = true;
  }
  PQconninfoFree(options);
  if (has_password) {
    return absl::InvalidArgumentError(
        "--postgres carries a password, which any user can read in the process list: put it in "
        "--postgres-password-file (a file holding only the password) or in PGPASSFILE");
  }
  return absl::OkStatus();
}

}  // namespace taskmaster::pg
