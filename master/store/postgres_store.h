// The PostgreSQL store (--store postgres): several masters share one database. The queues are
// split into partitions; a master serves a partition only while it holds the partition's lease
// row (an owner, an expiry on PostgreSQL's clock, a version), and every commit checks that
// version in the same transaction, so a master that lost its lease (paused, cut off) can write
// nothing more once another took over. docs/ha.md describes the design.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "master/store/queued_store.h"

namespace taskmaster {

struct PostgresStoreOptions {
  // A libpq connection string or URL, without a password.
  std::string conninfo;
  // A file holding only the password; empty: libpq's own lookup (PGPASSFILE, ~/.pgpass).
  std::string password_file;
  // Names this master process in the lease rows: unique per process start.
  std::string master_id;
  // The partition this store serves.
  int32_t partition = 0;
  // How many partitions the queues have: set when the schema is created, fixed afterwards (the
  // database's count wins). Up to this many masters serve at once; with one, the others stand by.
  int32_t partitions = 1;
  // A lease lasts this long after its last renewal; it is renewed every third of it. Another
  // master takes a partition over within about this long of its owner's death.
  int64_t lease_ms = 3'000;
  // Between tries while PostgreSQL cannot be reached, and between a standby's looks at the lease.
  int64_t retry_interval_ms = 500;
  int64_t connect_timeout_ms = 5'000;
  // A commit's rows of one table go in statements of about this many bytes at most (PostgreSQL
  // takes at most 1 GB in one); a row larger than this gets a statement of its own.
  size_t max_statement_bytes = size_t{64} << 20;
};

// A master's hold on its partition, as the master sees it.
class PostgresStore : public QueuedStore {
 public:
  // Who serves the partition when this master does not.
  struct Owner {
    std::string master_id;
    std::string address;
    bool live = false;  // its lease has not expired
  };

  // Blocks until this master holds the partition's lease, or `stopping` says to give up
  // (CANCELLED); `address` (host:port) is where clients reach it, told to the others. It tries
  // to take a free or expired lease only while `wanted` says so. Meanwhile `standing_by` hears
  // who serves, at every look. Load may be called only after it succeeded. `lost` runs (once,
  // on a thread of the store) when the lease is lost afterwards: the master must stop serving at
  // once.
  virtual absl::Status Acquire(const std::string& address, const std::function<bool()>& stopping,
                               const std::function<bool()>& wanted,
                               const std::function<void(const Owner&)>& standing_by,
                               std::function<void(const absl::Status&)> lost) = 0;
  // Gives the lease up now (a handover, or a clean stop), so that another master need not wait
  // for it to expire. Disarm first: a commit after it is refused.
  virtual void Release() = 0;
  // The partition's owner as PostgreSQL last said.
  virtual Owner CurrentOwner() const = 0;
  // No `lost` callback runs once this returns (one under way is waited for): the master calls
  // it before it goes.
  virtual void Disarm() = 0;

 protected:
  using QueuedStore::QueuedStore;
};

absl::StatusOr<std::unique_ptr<PostgresStore>> OpenPostgresStore(
    const PostgresStoreOptions& options);

// A master's place among those that share the database, serving or not: each counts the live
// ones to take its fair share of the partitions. One thread at a time.
class PostgresMembership {
 public:
  virtual ~PostgresMembership() = default;
  // How many partitions the queues have.
  virtual int32_t partitions() const = 0;
  // Says this master lives, at `address`, for a lease more; returns how many masters live, this
  // one included.
  virtual absl::StatusOr<int32_t> Beat(const std::string& address) = 0;
  // Leaves (a clean stop): the others count without it at once.
  virtual void Leave() = 0;
};

// Creates the schema when missing, with `options.partitions` partitions.
absl::StatusOr<std::unique_ptr<PostgresMembership>> OpenPostgresMembership(
    const PostgresStoreOptions& options);

// A connection string as logs may show it: without its password.
std::string RedactedConninfo(const std::string& conninfo);

}  // namespace taskmaster
