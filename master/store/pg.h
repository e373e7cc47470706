// A thin layer over libpq for the PostgreSQL store: a connection, statements with text
// parameters and binary results, whole transactions in one round trip with binary parameters
// (arrays of rows, or a row's fields) in PostgreSQL's binary format. Errors come back as
// statuses: UNAVAILABLE when the server cannot be reached or the connection broke (worth
// retrying), FAILED_PRECONDITION for anything the server refused.
#pragma once

#include <libpq-fe.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace taskmaster::pg {

// A query's result; rows are read in binary (network order).
class Result {
 public:
  explicit Result(PGresult* r) : r_(r, &PQclear) {}
  int rows() const { return PQntuples(r_.get()); }
  bool null(int row, int col) const { return PQgetisnull(r_.get(), row, col) != 0; }
  std::string_view bytes(int row, int col) const {
    return {PQgetvalue(r_.get(), row, col), static_cast<size_t>(PQgetlength(r_.get(), row, col))};
  }
  std::string text(int row, int col) const { return std::string(bytes(row, col)); }
  int64_t int64(int row, int col) const;  // int8, int4 or int2, by the column's length
  bool boolean(int row, int col) const { return !null(row, col) && bytes(row, col)[0] != 0; }

 private:
  std::unique_ptr<PGresult, decltype(&PQclear)> r_;
};

// A statement's parameters, in text form; nullopt is SQL NULL.
using Params = std::vector<std::optional<std::string>>;

// A table's row in PostgreSQL's binary record format, for an ArrayParam of the table's row type,
// which `unnest($1::schema.table[])` turns into the table's rows in one scan. Fields go in the
// table's column order, each of the column's type.
class Record {
 public:
  Record& Int16(int16_t v);
  Record& Int32(int32_t v);
  Record& Int64(int64_t v);
  Record& Bool(bool v);
  Record& Text(std::string_view v);
  Record& Bytea(std::string_view v);
  // The fields as a row of scalar parameters, "($1::int8, $2::text ...)", and their values.
  struct Scalars {
    std::string sql;
    std::vector<std::string> values;
  };
  Scalars AsScalars() const;

 private:
  friend class ArrayParam;
  template <typename T>
  Record& Fixed(uint32_t oid, T v);
  Record& Variable(uint32_t oid, std::string_view v);

  uint32_t count_ = 0;
  std::string fields_;  // each as its type, its length, then its bytes
};

// A one-dimensional array in PostgreSQL's binary format, for a statement's binary parameter:
// of a table's rows (Records, over the row type's oid), or of values (ids to delete).
class ArrayParam {
 public:
  // Element type oids.
  static constexpr uint32_t kBool = 16, kBytea = 17, kInt8 = 20, kInt2 = 21, kInt4 = 23, kText = 25;
  explicit ArrayParam(uint32_t element_oid) : oid_(element_oid) {}
  void Int64(int64_t v);
  void Bytes(std::string_view v);  // text or bytea
  void Add(const Record& row);
  size_t size() const { return count_; }
  // The array with its header.
  std::string Encode() const;

 private:
  uint32_t oid_;
  size_t count_ = 0;
  std::string elements_;  // each as its length, then its bytes
};

// One connection. Not thread-safe: each thread keeps its own.
class Connection {
 public:
  // `conninfo`: a libpq connection string or URL; `password` replaces the one libpq would find
  // (PGPASSWORD, PGPASSFILE, ~/.pgpass) when not empty.
  // `application_name` names the session in pg_stat_activity.
  static absl::StatusOr<std::unique_ptr<Connection>> Open(const std::string& conninfo,
                                                          const std::string& password,
                                                          const std::string& application_name,
                                                          std::chrono::milliseconds timeout);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Runs one statement (or, without parameters, several separated by ';').
  absl::StatusOr<Result> Exec(const std::string& sql, const Params& params = {});
  absl::Status Run(const std::string& sql, const Params& params = {});
  // A statement of a Transaction: its parameters are text, or binary (an ArrayParam's encoding,
  // a Record's fields).
  struct Statement {
    std::string sql;
    std::vector<std::string> params;
    bool binary = false;
  };
  // Runs `statements` as one transaction in one round trip (libpq's pipeline mode: all are sent,
  // then a sync, then the results are read). The first error aborts the transaction, and is
  // returned; `error_codes` maps SQLSTATEs of the statements' own errors to status codes.
  absl::Status Transaction(const std::vector<Statement>& statements,
                           const std::map<std::string, absl::StatusCode>& error_codes = {});
  // Streams a query's rows one at a time to `row` (a Result of one row); stops at its error.
  absl::Status ForEachRow(const std::string& sql, const Params& params,
                          const std::function<absl::Status(const Result&)>& row);
  // Whether the connection is still up, as libpq last saw it.
  bool ok() const { return PQstatus(conn_) == CONNECTION_OK; }

 private:
  explicit Connection(PGconn* conn) : conn_(conn) {}
  absl::Status ResultError(PGresult* r, std::string_view doing,
                           const std::map<std::string, absl::StatusCode>& error_codes = {});
  absl::Status ConnectionError(std::string_view doing);

  PGconn* conn_;
  // Statements of Transaction prepared on this connection: their SQL → their name.
  std::map<std::string, std::string> prepared_;
  int64_t statements_prepared_ = 0;  // names are never reused
};

// The connection string without its password, for logs and errors.
std::string Redacted(const std::string& conninfo);
// An error when `conninfo` carries a password: it would show in ps and in shell histories.
absl::Status RefusePasswordIn(const std::string& conninfo);

}  // namespace taskmaster::pg
