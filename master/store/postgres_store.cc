// The PostgreSQL store: schema, the writer's commits (one transaction in one round trip, each
// kind of change one statement over the whole batch), recovery's reads, and the partition lease.
#include "master/store/postgres_store.h"

#include <chrono>
#include <cstdlib>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/partition.h"
#include "common/util.h"
#include "master/store/labels.h"
#include "master/store/pg.h"

namespace taskmaster {
namespace {

// Bump with a migration when the schema changes.
constexpr int kSchemaVersion = 1;
// Serializes schema creation among masters starting at once (pg_advisory_xact_lock's key).
constexpr int64_t kSchemaLock = 0x544D5047;  // 'TMPG'

constexpr char kSchema[] = R"sql(
CREATE SCHEMA IF NOT EXISTS taskmaster;
CREATE TABLE IF NOT EXISTS taskmaster.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS taskmaster.partitions (
  id int PRIMARY KEY,
  owner text NOT NULL DEFAULT '',
  address text NOT NULL DEFAULT '',
  version bigint NOT NULL DEFAULT 0,
  expires_at timestamptz NOT NULL DEFAULT '-infinity',
  highest_task_id bigint NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS taskmaster.jobs (
  job_id text PRIMARY KEY, part int NOT NULL, total bigint NOT NULL, created_ms bigint NOT NULL,
  tenant bytea NOT NULL, open bool NOT NULL, batches bigint NOT NULL);
CREATE TABLE IF NOT EXISTS taskmaster.tasks (
  id bigint PRIMARY KEY, part int NOT NULL, job_id text NOT NULL, queue text NOT NULL,
  kind text NOT NULL, labels text NOT NULL, payload bytea NOT NULL, priority int NOT NULL,
  max_attempts int NOT NULL, timeout_ms bigint NOT NULL, created_ms bigint NOT NULL,
  idempotency_key bytea NOT NULL, state smallint NOT NULL, attempts int NOT NULL,
  not_before_ms bigint NOT NULL, finished_ms bigint NOT NULL, seq bigint NOT NULL,
  completion_seq bigint NOT NULL, output bytea NOT NULL, error bytea NOT NULL,
  worker bytea NOT NULL, worker_id bytea NOT NULL);
-- A task's status once it changed after its submit (most often: its result). Kept apart so that
-- the common life of a task is two inserts, never an update (and never a dead row) in PostgreSQL.
CREATE TABLE IF NOT EXISTS taskmaster.statuses (
  id bigint PRIMARY KEY, state smallint NOT NULL, attempts int NOT NULL,
  not_before_ms bigint NOT NULL, finished_ms bigint NOT NULL, seq bigint NOT NULL,
  completion_seq bigint NOT NULL, output bytea NOT NULL, error bytea NOT NULL,
  worker bytea NOT NULL, worker_id bytea NOT NULL);
-- Every task as it is now: its submit, with its later status when it has one. Recovery reads it;
-- so can a person.
CREATE OR REPLACE VIEW taskmaster.current_tasks AS
  SELECT t.id, t.part, t.job_id, t.queue, t.kind, t.labels, t.payload, t.priority,
         t.max_attempts, t.timeout_ms, t.created_ms, t.idempotency_key,
         COALESCE(s.state, t.state) AS state, COALESCE(s.attempts, t.attempts) AS attempts,
         COALESCE(s.not_before_ms, t.not_before_ms) AS not_before_ms,
         COALESCE(s.finished_ms, t.finished_ms) AS finished_ms, COALESCE(s.seq, t.seq) AS seq,
         COALESCE(s.completion_seq, t.completion_seq) AS completion_seq,
         COALESCE(s.output, t.output) AS output, COALESCE(s.error, t.error) AS error,
         COALESCE(s.worker, t.worker) AS worker, COALESCE(s.worker_id, t.worker_id) AS worker_id
  FROM taskmaster.tasks t LEFT JOIN taskmaster.statuses s ON s.id = t.id;
CREATE TABLE IF NOT EXISTS taskmaster.job_members (
  job_id text NOT NULL, task_id bigint NOT NULL, position bigint NOT NULL, part int NOT NULL,
  PRIMARY KEY (job_id, task_id));
-- Every master that runs, serving or not: each counts the live ones to take its fair share of
-- the partitions.
CREATE TABLE IF NOT EXISTS taskmaster.masters (
  id text PRIMARY KEY, address text NOT NULL, expires_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS taskmaster.workers (
  part int NOT NULL, worker_id bytea NOT NULL, secret text NOT NULL,
  PRIMARY KEY (part, worker_id));
-- The first statement of every commit: only the lease's holder at its version may write, and
-- the row stays locked until the commit ends, so a takeover waits for it, and every later
-- commit of a master that lost its lease fails here (SQLSTATE TM001).
CREATE OR REPLACE FUNCTION taskmaster.fence(part int, holder text, lease_version bigint,
                                            highest bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  UPDATE taskmaster.partitions SET highest_task_id = GREATEST(highest_task_id, highest)
    WHERE id = part AND owner = holder AND version = lease_version;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'partition % was taken over by another master: this master''s unwritten '
                    'changes are dropped', part USING ERRCODE = 'TM001';
  END IF;
END $$;
)sql";

constexpr char kTaskColumns[] =
    "id, part, job_id, queue, kind, labels, payload, priority, max_attempts, timeout_ms, "
    "created_ms, idempotency_key, state, attempts, not_before_ms, finished_ms, seq, "
    "completion_seq, output, error, worker, worker_id";

using pg::ArrayParam;
using pg::Record;

// The tables a commit writes, whose rows go as Records of their row types.
constexpr const char* kWrittenTables[] = {"taskmaster.jobs", "taskmaster.tasks",
                                          "taskmaster.statuses", "taskmaster.job_members"};
enum WrittenTable { kJobs, kTasks, kStatuses, kJobMembers };

// A status's columns, after its task id, in the tables' order (tasks, statuses).
Record& AddStatus(Record& row, const TaskStatusRow& st) {
  return row.Int16(static_cast<int16_t>(st.state))
      .Int32(st.attempts)
      .Int64(st.not_before_ms)
      .Int64(st.finished_ms)
      .Int64(static_cast<int64_t>(st.seq))
      .Int64(static_cast<int64_t>(st.completion_seq))
      .Bytea(st.output)
      .Bytea(st.error)
      .Bytea(st.worker)
      .Bytea(st.worker_id);
}

Record TaskRecord(const TaskRow& t, int32_t partition) {
  Record row;
  row.Int64(static_cast<int64_t>(t.id))
      .Int32(partition)
      .Text(t.job_id)
      .Text(t.queue)
      .Text(t.kind)
      .Text(EncodeLabels(t.labels))
      .Bytea(t.payload)
      .Int32(t.priority)
      .Int32(t.max_attempts)
      .Int64(t.timeout_ms)
      .Int64(t.created_ms)
      .Bytea(t.idempotency_key);
  AddStatus(row, t.status);
  return row;
}

// About a row's bytes in a statement: each field's type and length (8 bytes), the fixed-size
// values, then the others.
size_t RowBytes(const TaskStatusRow& st) {
  return 128 + st.output.size() + st.error.size() + st.worker.size() + st.worker_id.size();
}

size_t RowBytes(const TaskRow& t) {
  size_t labels = 0;
  for (const auto& [key, value] : t.labels) labels += key.size() + value.size() + 8;
  return 128 + t.job_id.size() + t.queue.size() + t.kind.size() + labels + t.payload.size() +
         t.idempotency_key.size() + RowBytes(t.status);
}

// Rows of one table for one statement: an array of records, the first also kept whole, since
// a lone row goes as scalars (see Write).
struct RowSet {
  explicit RowSet(uint32_t row_type) : array(row_type) {}
  void Add(Record row) {
    array.Add(row);
    if (array.size() == 1) first = std::move(row);
  }
  ArrayParam array;
  Record first;
};

// A table's rows of one commit, in statements of about `limit` bytes at most: a statement's
// parameters travel in one protocol message, which PostgreSQL caps at 1 GB (a row larger than
// the limit gets a statement of its own).
class Chunks {
 public:
  Chunks(size_t limit, uint32_t row_type) : limit_(limit), row_type_(row_type) {}
  // The rows to add a row of `bytes` to.
  RowSet& For(size_t bytes) {
    if (chunks_.empty() || bytes_ + bytes > limit_) {
      chunks_.emplace_back(row_type_);
      bytes_ = 0;
    }
    bytes_ += bytes;
    return chunks_.back();
  }
  const std::vector<RowSet>& all() const { return chunks_; }

 private:
  const size_t limit_;
  const uint32_t row_type_;
  size_t bytes_ = 0;  // of the last chunk
  std::vector<RowSet> chunks_;
};

std::string Ms(int64_t ms) { return std::to_string(ms); }

// A session's application_name: PostgreSQL keeps 63 bytes of it.
std::string SessionName(const std::string& master_id) {
  return absl::StrCat("taskmaster:", master_id).substr(0, 63);
}

// What every master of a database shares, whatever partition it serves.
struct PostgresLayout {
  std::string epoch;
  int32_t partitions = 1;
};

using MetaValues = std::map<std::string, std::string>;

absl::StatusOr<MetaValues> ReadMeta(pg::Connection& c) {
  absl::StatusOr<pg::Result> meta = c.Exec("SELECT key, value FROM taskmaster.meta");
  if (!meta.ok()) return meta.status();
  MetaValues values;
  for (int i = 0; i < meta->rows(); ++i) values[meta->text(i, 0)] = meta->text(i, 1);
  return values;
}

// Creates (or updates) the schema, with `options.partitions` partitions when the database had
// none; returns taskmaster.meta.
absl::StatusOr<MetaValues> CreateSchema(pg::Connection& c, const PostgresStoreOptions& options) {
  // One transaction, under a lock every master takes: two masters starting on an empty
  // database create the schema once.
  absl::Status s = c.Run("BEGIN");
  if (s.ok()) s = c.Run("SELECT pg_advisory_xact_lock($1)", {std::to_string(kSchemaLock)});
  if (s.ok()) s = c.Run(kSchema);
  absl::StatusOr<MetaValues> values = MetaValues{};
  if (s.ok()) {
    values = ReadMeta(c);
    s = values.status();
  }
  if (s.ok() && values->empty()) {
    *values = {{"schema_version", std::to_string(kSchemaVersion)},
               {"epoch", RandomHex(8)},
               {"partitions", std::to_string(options.partitions)}};
    for (const auto& [key, value] : *values) {
      if (s.ok()) {
        s = c.Run("INSERT INTO taskmaster.meta(key, value) VALUES($1, $2)", {key, value});
      }
    }
    if (s.ok()) {
      s = c.Run(
          "INSERT INTO taskmaster.partitions(id) SELECT generate_series(0, $1 - 1) "
          "ON CONFLICT DO NOTHING",
          {std::to_string(options.partitions)});
    }
  }
  if (s.ok()) s = c.Run("COMMIT");
  if (!s.ok()) return s;
  return values;
}

absl::StatusOr<PostgresLayout> LayoutOf(MetaValues values, const PostgresStoreOptions& options) {
  if (values["schema_version"] != std::to_string(kSchemaVersion)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the taskmaster schema in ", pg::Redacted(options.conninfo), " is of version ",
                     values["schema_version"], "; this master knows ", kSchemaVersion,
                     " only: run the taskmaster release that wrote it"));
  }
  PostgresLayout layout;
  layout.epoch = values["epoch"];
  // Databases made before partitions have one.
  layout.partitions = values.contains("partitions") ? std::atoi(values["partitions"].c_str()) : 1;
  if (layout.partitions < 1 || layout.partitions > kMaxPartitions) {
    return absl::DataLossError(absl::StrCat("taskmaster.meta says ", values["partitions"],
                                            " partitions; 1 to ", kMaxPartitions, " can be"));
  }
  return layout;
}

class PostgresStoreImpl final : public PostgresStore {
 public:
  PostgresStoreImpl(PostgresStoreOptions options, std::string password)
      // A lease is not written: after a takeover the worker that holds the task claims it back,
      // and a lease lost with its worker is the same as one never granted.
      : PostgresStore(GetLogger("store"), options.retry_interval_ms, /*writes_leases=*/false),
        options_(std::move(options)),
        password_(std::move(password)) {}

  ~PostgresStoreImpl() override {
    Close();
    {
      absl::MutexLock lock(&lease_mu_);
      lease_stop_ = true;
    }
    if (lease_thread_.joinable()) lease_thread_.join();
    if (lease_watch_.joinable()) lease_watch_.join();
    Release();
  }

  absl::Status Open() {
    absl::StatusOr<std::unique_ptr<pg::Connection>> conn = Connect();
    if (!conn.ok()) return conn.status();
    // The master made the schema at its start (see PostgresMembership): a partition's store only
    // reads the layout, unless it runs alone (tools, tests).
    absl::StatusOr<pg::Result> made =
        (*conn)->Exec("SELECT to_regclass('taskmaster.meta') IS NOT NULL");
    if (!made.ok()) return made.status();
    absl::StatusOr<MetaValues> meta =
        made->boolean(0, 0) ? ReadMeta(**conn) : CreateSchema(**conn, options_);
    if (!meta.ok()) return meta.status();
    absl::StatusOr<PostgresLayout> layout = LayoutOf(std::move(*meta), options_);
    if (!layout.ok()) return layout.status();
    if (options_.partition < 0 || options_.partition >= layout->partitions) {
      return absl::InvalidArgumentError(absl::StrCat("partition ", options_.partition,
                                                     " does not exist: the database has ",
                                                     layout->partitions));
    }
    if (absl::Status s = (*conn)->Run(ReaderSetup()); !s.ok()) return s;
    // Commits send rows as records of their tables' row types, which arrays name by oid.
    absl::StatusOr<pg::Result> types = (*conn)->Exec(
        "SELECT $1::regtype::oid, $2::regtype::oid, $3::regtype::oid, "
        "$4::regtype::oid",
        pg::Params(std::begin(kWrittenTables), std::end(kWrittenTables)));
    if (!types.ok()) return types.status();
    for (int i = 0; i < static_cast<int>(std::size(row_types_)); ++i) {
      row_types_[i] = static_cast<uint32_t>(types->int64(0, i));
    }
    epoch_ = layout->epoch;
    reader_ = std::move(*conn);
    return absl::OkStatus();
  }

  std::string Epoch() const override { return epoch_; }
  bool persistent() const override { return true; }

  absl::Status Acquire(const std::string& address, const std::function<bool()>& stopping,
                       const std::function<bool()>& wanted,
                       const std::function<void(const Owner&)>& standing_by,
                       std::function<void(const absl::Status&)> lost) override {
    bool told_standby = false;
    while (!stopping()) {
      // PostgreSQL's expiry counts from its transaction's start, after this.
      const auto began = std::chrono::steady_clock::now();
      absl::StatusOr<int64_t> version = wanted() ? TryAcquire(address) : LookAtOwner();
      if (version.ok()) {
        {
          absl::MutexLock lock(&lease_mu_);
          version_ = *version;
          renewed_at_ = began;
          lost_ = std::move(lost);
        }
        log_->info("this master now serves partition {} (lease version {})", options_.partition,
                   *version);
        lease_thread_ = std::thread([this] { LeaseLoop(); });
        lease_watch_ = std::thread([this] { WatchLease(); });
        StartWriter();
        return absl::OkStatus();
      }
      if (!absl::IsNotFound(version.status())) {
        log_->warn("cannot take the partition lease: {}", std::string(version.status().message()));
      } else {
        const Owner owner = CurrentOwner();
        standing_by(owner);
        if (!told_standby) {
          log_->info("standing by: partition {} is served by {} at {}", options_.partition,
                     Printable(owner.master_id), Printable(owner.address));
          told_standby = true;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(options_.retry_interval_ms));
    }
    return absl::CancelledError("stopped while standing by");
  }

  Owner CurrentOwner() const override {
    absl::MutexLock lock(&lease_mu_);
    return owner_;
  }

  void Disarm() override {
    // Waits for a callback under way: the master may go once this returns.
    absl::MutexLock calling(&callback_mu_);
    absl::MutexLock lock(&lease_mu_);
    lost_ = nullptr;
  }

 private:
  std::string Part() const { return std::to_string(options_.partition); }

  // Every session of this master is named after it, so that a master taking over can end
  // the sessions of one whose lease expired (see TryAcquire).
  absl::StatusOr<std::unique_ptr<pg::Connection>> Connect() const {
    return pg::Connection::Open(options_.conninfo, password_, SessionName(options_.master_id),
                                std::chrono::milliseconds(options_.connect_timeout_ms));
  }

  // Opens `conn` again, running `setup` on the new session, unless it is still up.
  absl::Status Reconnect(std::unique_ptr<pg::Connection>& conn, const std::string& setup = "") {
    if (conn && conn->ok()) return absl::OkStatus();
    absl::StatusOr<std::unique_ptr<pg::Connection>> fresh = Connect();
    if (!fresh.ok()) return fresh.status();
    if (!setup.empty()) {
      if (absl::Status s = (*fresh)->Run(setup); !s.ok()) return s;
    }
    conn = std::move(*fresh);
    return absl::OkStatus();
  }

  // The lease row may be locked by its owner's commit (or by a paused owner until its session
  // ends): the reader looks again later rather than wait.
  std::string ReaderSetup() const {
    return absl::StrCat("SET lock_timeout = ", std::max<int64_t>(options_.retry_interval_ms, 1));
  }

  // Takes the lease when it is free or expired: its new version, or NOT_FOUND while another
  // master holds it (then owner_ says who).
  absl::StatusOr<int64_t> TryAcquire(const std::string& address) {
    if (absl::Status s = Reconnect(reader_, ReaderSetup()); !s.ok()) return s;
    absl::StatusOr<pg::Result> r = reader_->Exec(
        "UPDATE taskmaster.partitions SET owner = $1, address = $2, version = version + 1, "
        "expires_at = now() + $3 * interval '1 millisecond' "
        "WHERE id = $4 AND (owner = '' OR expires_at < now()) RETURNING version",
        {options_.master_id, address, Ms(options_.lease_ms), Part()});
    if (!r.ok() && !absl::IsUnavailable(r.status())) {
      // The row is locked. A master paused or cut off in the middle of a commit holds that lock
      // for as long as its session lives (the server ends only sessions idle in a transaction,
      // and one cut off mid-send is not): once its lease has expired, its sessions are ended.
      absl::StatusOr<pg::Result> ended = reader_->Exec(
          "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a "
          "JOIN taskmaster.partitions p ON a.application_name = left('taskmaster:' || p.owner, "
          "63) WHERE p.id = $1 AND p.owner <> '' AND p.owner <> $2 AND p.expires_at < now()",
          {Part(), options_.master_id});
      if (ended.ok() && ended->rows() == 1 && ended->int64(0, 0) > 0) {
        log_->warn(
            "ended {} sessions of the master whose lease on partition {} expired while "
            "it held the lease row's lock",
            ended->int64(0, 0), options_.partition);
      }
    }
    if (!r.ok()) return r.status();
    if (r->rows() == 1) return r->int64(0, 0);
    return LookAtOwner();
  }

  // Who holds the lease (into owner_); NOT_FOUND when that worked.
  absl::StatusOr<int64_t> LookAtOwner() {
    if (absl::Status s = Reconnect(reader_, ReaderSetup()); !s.ok()) return s;
    absl::StatusOr<pg::Result> owner = reader_->Exec(
        "SELECT owner, address, expires_at >= now() FROM taskmaster.partitions WHERE id = $1",
        {Part()});
    if (!owner.ok()) return owner.status();
    if (owner->rows() == 1) {
      absl::MutexLock lock(&lease_mu_);
      owner_ = {owner->text(0, 0), owner->text(0, 1), owner->boolean(0, 2)};
    }
    return absl::NotFoundError("held by another master");
  }

  // Renews the lease every third of its length on a connection of its own, until it is lost
  // or the store closes.
  void LeaseLoop() {
    using Clock = std::chrono::steady_clock;
    std::unique_ptr<pg::Connection> conn;
    const auto lease = std::chrono::milliseconds(options_.lease_ms);
    const auto retry =
        std::min<Clock::duration>(std::chrono::milliseconds(options_.retry_interval_ms), lease / 6);
    Clock::time_point next;
    {
      absl::MutexLock lock(&lease_mu_);
      next = renewed_at_ + lease / 3;
    }
    while (SleepUntil(next)) {
      const auto began = Clock::now();
      const absl::Status renewed = Renew(conn);
      if (renewed.ok()) {
        absl::MutexLock lock(&lease_mu_);
        renewed_at_ = began;
        next = began + lease / 3;
        continue;
      }
      if (absl::IsNotFound(renewed)) {
        LoseLease(absl::UnavailableError("another master took this master's partition over"));
        return;
      }
      log_->warn("cannot renew the partition lease, trying again: {}",
                 std::string(renewed.message()));
      next = Clock::now() + retry;
    }
  }

  // Ends the lease on the master's own monotonic clock, apart from the renewals, which may hang
  // on a connection PostgreSQL no longer answers: the lease counts from before each renewal was
  // sent, so it ends here before it ends on PostgreSQL's clock (less a tenth, for the two clocks'
  // rates).
  void WatchLease() {
    const auto lease = std::chrono::milliseconds(options_.lease_ms);
    while (true) {
      std::chrono::steady_clock::time_point ends;
      {
        absl::MutexLock lock(&lease_mu_);
        ends = renewed_at_ + lease - lease / 10;
      }
      if (std::chrono::steady_clock::now() >= ends) break;
      if (!SleepUntil(
              std::min(ends, std::chrono::steady_clock::now() + std::chrono::milliseconds(20)))) {
        return;
      }
    }
    LoseLease(absl::UnavailableError("the partition lease ran out unrenewed"));
  }

  // Sleeps until `until` in short steps on the monotonic clock (a timed mutex wait would follow
  // the wall clock); false when the store closes meanwhile or the lease was lost.
  bool SleepUntil(std::chrono::steady_clock::time_point until) {
    while (true) {
      {
        absl::MutexLock lock(&lease_mu_);
        if (lease_stop_ || !lost_status_.ok()) return false;
      }
      const auto now = std::chrono::steady_clock::now();
      if (now >= until) return true;
      std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(
          std::chrono::milliseconds(20), until - now));
    }
  }

  // Tells the master (once) that it must stop serving, unless it was disarmed.
  void LoseLease(const absl::Status& why) {
    absl::MutexLock calling(&callback_mu_);
    std::function<void(const absl::Status&)> lost;
    {
      absl::MutexLock lock(&lease_mu_);
      if (lost_status_.ok()) lost_status_ = why;
      lost = std::move(lost_);
      lost_ = nullptr;
    }
    if (lost) lost(why);
  }

  absl::Status Renew(std::unique_ptr<pg::Connection>& conn) {
    if (absl::Status s = Reconnect(conn); !s.ok()) return s;
    int64_t version;
    {
      absl::MutexLock lock(&lease_mu_);
      version = version_;
    }
    absl::StatusOr<pg::Result> r = conn->Exec(
        "UPDATE taskmaster.partitions SET expires_at = now() + $1 * interval '1 millisecond' "
        "WHERE id = $2 AND owner = $3 AND version = $4 RETURNING id",
        {Ms(options_.lease_ms), Part(), options_.master_id, std::to_string(version)});
    if (!r.ok()) return r.status();
    if (r->rows() != 1) return absl::NotFoundError("the lease has another holder");
    return absl::OkStatus();
  }

  // On the connection Acquire and Load used, idle since.
  void Release() override {
    int64_t version;
    {
      absl::MutexLock lock(&lease_mu_);
      if (version_ == 0 || !lost_status_.ok()) return;
      version = version_;
    }
    {
      // Renewals stop first: one after the release would take the lease back.
      absl::MutexLock lock(&lease_mu_);
      lease_stop_ = true;
      version_ = 0;
    }
    if (lease_thread_.joinable()) lease_thread_.join();
    if (lease_watch_.joinable()) lease_watch_.join();
    if (!Reconnect(reader_, ReaderSetup()).ok()) return;
    reader_
        ->Run(
            "UPDATE taskmaster.partitions SET owner = '', expires_at = '-infinity' "
            "WHERE id = $1 AND owner = $2 AND version = $3",
            {Part(), options_.master_id, std::to_string(version)})
        .IgnoreError();
    log_->info("released partition {}", options_.partition);
  }

  absl::Status LoadRecords(RecoveryVisitor* visitor) override {
    pg::Connection& c = *reader_;
    const pg::Params part = {Part()};
    absl::Status s = c.ForEachRow(
        "SELECT job_id, total, created_ms, tenant, open, batches FROM taskmaster.jobs "
        "WHERE part = $1",
        part, [&](const pg::Result& r) {
          visitor->OnJob({r.text(0, 0), r.int64(0, 1), r.int64(0, 2), r.text(0, 3), r.boolean(0, 4),
                          r.int64(0, 5)});
          return absl::OkStatus();
        });
    if (s.ok()) {
      s = c.ForEachRow(
          absl::StrCat("SELECT ", kTaskColumns, " FROM taskmaster.current_tasks WHERE part = $1"),
          part, [&](const pg::Result& r) { return OnTaskRow(r, visitor); });
    }
    if (s.ok()) {
      s = c.ForEachRow(
          "SELECT job_id, task_id, position FROM taskmaster.job_members WHERE part = $1", part,
          [&](const pg::Result& r) {
            visitor->OnJobMember({r.text(0, 0), static_cast<TaskId>(r.int64(0, 1)), r.int64(0, 2)});
            return absl::OkStatus();
          });
    }
    if (s.ok()) {
      s = c.ForEachRow("SELECT worker_id, secret FROM taskmaster.workers WHERE part = $1", part,
                       [&](const pg::Result& r) {
                         visitor->OnWorker({r.text(0, 0), r.text(0, 1)});
                         return absl::OkStatus();
                       });
    }
    if (!s.ok()) return s;
    absl::StatusOr<pg::Result> highest =
        c.Exec("SELECT highest_task_id FROM taskmaster.partitions WHERE id = $1", part);
    if (!highest.ok()) return highest.status();
    if (highest->rows() == 1) visitor->OnHighestTaskId(static_cast<TaskId>(highest->int64(0, 0)));
    return absl::OkStatus();
  }

  static absl::Status OnTaskRow(const pg::Result& r, RecoveryVisitor* visitor) {
    TaskRow t;
    t.id = static_cast<TaskId>(r.int64(0, 0));
    t.job_id = r.text(0, 2);
    t.queue = r.text(0, 3);
    t.kind = r.text(0, 4);
    absl::StatusOr<Labels> labels = DecodeLabels(r.bytes(0, 5));
    if (!labels.ok()) {
      return absl::DataLossError(absl::StrCat("task ", t.id, ": ", labels.status().message()));
    }
    t.labels = std::move(*labels);
    t.payload = r.text(0, 6);
    t.priority = static_cast<int32_t>(r.int64(0, 7));
    t.max_attempts = static_cast<int32_t>(r.int64(0, 8));
    t.timeout_ms = r.int64(0, 9);
    t.created_ms = r.int64(0, 10);
    t.idempotency_key = r.text(0, 11);
    const int64_t state = r.int64(0, 12);
    if (state < static_cast<int64_t>(TaskState::kPending) ||
        state > static_cast<int64_t>(TaskState::kCancelled)) {
      return absl::DataLossError(absl::StrCat("task ", t.id, " has an unknown state ", state));
    }
    t.status.state = static_cast<TaskState>(state);
    t.status.attempts = static_cast<int32_t>(r.int64(0, 13));
    t.status.not_before_ms = r.int64(0, 14);
    t.status.finished_ms = r.int64(0, 15);
    t.status.seq = static_cast<uint64_t>(r.int64(0, 16));
    t.status.completion_seq = static_cast<uint64_t>(r.int64(0, 17));
    t.status.output = r.text(0, 18);
    t.status.error = r.text(0, 19);
    t.status.worker = r.text(0, 20);
    t.status.worker_id = r.text(0, 21);
    visitor->OnTask(std::move(t));
    return absl::OkStatus();
  }

  // ---- The writer ----

  CommitFailure AfterCommit(const absl::Status& status) override {
    if (absl::IsAborted(status)) {
      fenced_ = status;
      // Fenced off: another master serves the partition now. Nothing of this transaction was
      // written and nothing this master holds ever will be: its clients hear so at once.
      LoseLease(status);
      return CommitFailure::kRefuseSubmits;
    }
    if (!status.ok() && !absl::IsUnavailable(status)) {
      // Refused for what it holds, not for want of a server: trying again cannot help, and the
      // lease would keep a standby from serving meanwhile. Nothing unwritten was acknowledged;
      // another master takes over from what is written.
      StopTheMaster(status, "PostgreSQL refuses this commit, and no retry can change that");
    }
    // A lost connection may have lost the COMMIT's answer, not the commit: every change is
    // written again (each write is idempotent) until one commit succeeds.
    return CommitFailure::kRetryAll;
  }

  absl::Status Commit(const std::vector<StoreChange>& batch) override {
    if (!fenced_.ok()) return fenced_;  // for good: another master serves the partition now
    // A master paused (or cut off) inside a commit keeps its transaction open, and with it the
    // lock on its lease row that a standby's takeover waits for: the server ends such a session
    // once it has been idle in its transaction for half a lease.
    if (absl::Status s = Reconnect(writer_, absl::StrCat("SET idle_in_transaction_session_timeout "
                                                         "= ",
                                                         options_.lease_ms / 2));
        !s.ok()) {
      return s;
    }
    absl::Status s = Write(batch);
    // A connection that failed mid-transaction is not trusted again: the next commit opens
    // another.
    if (absl::IsUnavailable(s)) writer_.reset();
    return s;
  }

  absl::Status Write(const std::vector<StoreChange>& batch) {
    pg::Connection& c = *writer_;
    Chunks tasks(options_.max_statement_bytes, row_types_[kTasks]);
    Chunks statuses(options_.max_statement_bytes, row_types_[kStatuses]);
    RowSet members(row_types_[kJobMembers]);
    std::map<std::string, const JobRow*> job_rows;  // the last row of each job in the batch
    ArrayParam deleted_tasks{ArrayParam::kInt8}, deleted_jobs{ArrayParam::kText};
    std::vector<const StoreChange*> worker_changes;
    TaskId highest = 0;
    for (const StoreChange& op : batch) {
      switch (op.kind) {
        case StoreChange::Kind::kNone:
          break;
        case StoreChange::Kind::kSubmit:
          job_rows[op.submit->job.job_id] = &op.submit->job;
          for (const TaskRow& t : op.submit->tasks) {
            highest = std::max(highest, t.id);
            tasks.For(RowBytes(t)).Add(TaskRecord(t, options_.partition));
          }
          for (const JobMemberRow& m : op.submit->members) {
            members.Add(Record()
                            .Text(m.job_id)
                            .Int64(static_cast<int64_t>(m.task_id))
                            .Int64(m.position)
                            .Int32(options_.partition));
          }
          break;
        case StoreChange::Kind::kUpdateTask: {
          Record row;
          row.Int64(static_cast<int64_t>(op.task_id));
          statuses.For(RowBytes(op.status)).Add(AddStatus(row, op.status));
          break;
        }
        case StoreChange::Kind::kDeleteTask:
          deleted_tasks.Int64(static_cast<int64_t>(op.task_id));
          break;
        case StoreChange::Kind::kDeleteJob:
          deleted_jobs.Bytes(op.key);
          break;
        case StoreChange::Kind::kPutWorker:
        case StoreChange::Kind::kDeleteWorker:
          worker_changes.push_back(&op);
          break;
      }
    }
    int64_t version;
    {
      absl::MutexLock lock(&lease_mu_);
      version = version_;
    }
    std::vector<pg::Connection::Statement> statements;
    statements.push_back(
        {"SELECT taskmaster.fence($1, $2, $3, $4)",
         {Part(), options_.master_id, std::to_string(version), std::to_string(highest)}});
    // "INSERT INTO `table` SELECT * FROM (the rows) `then`". A lone row (what a lone round trip
    // commits) goes as scalars in VALUES, the cheapest way measured (docs/ha.md).
    auto insert = [&](WrittenTable table, const RowSet& rows, const std::string& then) {
      const char* name = kWrittenTables[table];
      if (rows.array.size() > 1) {
        statements.push_back(
            {absl::StrCat("INSERT INTO ", name, " SELECT * FROM unnest($1::", name, "[]) ", then),
             {rows.array.Encode()},
             /*binary=*/true});
        return;
      }
      Record::Scalars row = rows.first.AsScalars();
      statements.push_back(
          {absl::StrCat("INSERT INTO ", name, " SELECT * FROM (VALUES ", row.sql, ") AS r ", then),
           std::move(row.values), /*binary=*/true});
    };
    if (!job_rows.empty()) {
      RowSet jobs(row_types_[kJobs]);
      for (const auto& [job_id, job] : job_rows) {
        jobs.Add(Record()
                     .Text(job_id)
                     .Int32(options_.partition)
                     .Int64(job->total)
                     .Int64(job->created_ms)
                     .Bytea(job->tenant)
                     .Bool(job->open)
                     .Int64(job->batches));
      }
      insert(kJobs, jobs,
             "ON CONFLICT (job_id) DO UPDATE SET total = EXCLUDED.total, open = EXCLUDED.open, "
             "batches = EXCLUDED.batches");
    }
    for (const RowSet& chunk : tasks.all()) insert(kTasks, chunk, "ON CONFLICT (id) DO NOTHING");
    if (members.array.size() > 0) {
      insert(kJobMembers, members,
             "ON CONFLICT (job_id, task_id) DO UPDATE SET position = EXCLUDED.position");
    }
    for (const RowSet& chunk : statuses.all()) {
      insert(kStatuses, chunk,
             "ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, attempts = "
             "EXCLUDED.attempts, not_before_ms = EXCLUDED.not_before_ms, finished_ms = "
             "EXCLUDED.finished_ms, seq = EXCLUDED.seq, completion_seq = EXCLUDED.completion_seq, "
             "output = EXCLUDED.output, error = EXCLUDED.error, worker = EXCLUDED.worker, "
             "worker_id = EXCLUDED.worker_id");
    }
    if (deleted_tasks.size() > 0) {
      const std::string ids = deleted_tasks.Encode();
      for (const char* table : {"statuses", "tasks"}) {
        statements.push_back(
            {absl::StrCat("DELETE FROM taskmaster.", table, " WHERE id = ANY($1::bigint[])"),
             {ids},
             /*binary=*/true});
      }
    }
    if (deleted_jobs.size() > 0) {
      const std::string ids = deleted_jobs.Encode();
      for (const char* table : {"job_members", "jobs"}) {
        statements.push_back(
            {absl::StrCat("DELETE FROM taskmaster.", table, " WHERE job_id = ANY($1::text[])"),
             {ids},
             /*binary=*/true});
      }
    }
    // Worker ids come from peers: bytes, in binary.
    for (const StoreChange* op : worker_changes) {
      statements.push_back(
          op->kind == StoreChange::Kind::kPutWorker
              ? pg::Connection::Statement{absl::StrCat("INSERT INTO taskmaster.workers(part, "
                                                       "worker_id, secret) VALUES(",
                                                       options_.partition,
                                                       ", $1::bytea, $2::text) ON CONFLICT "
                                                       "(part, worker_id) DO UPDATE SET secret = "
                                                       "EXCLUDED.secret"),
                                          {op->key, op->secret},
                                          /*binary=*/true}
              : pg::Connection::Statement{
                    absl::StrCat("DELETE FROM taskmaster.workers WHERE part = ", options_.partition,
                                 " AND worker_id = $1::bytea"),
                    {op->key},
                    /*binary=*/true});
    }
    return c.Transaction(statements, {{"TM001", absl::StatusCode::kAborted}});
  }

  const PostgresStoreOptions options_;
  const std::string password_;
  std::string epoch_;                                   // set by Open
  uint32_t row_types_[std::size(kWrittenTables)] = {};  // by WrittenTable; set by Open
  // Open's, then Acquire's and Load's (before the writer starts): one thread at a time.
  std::unique_ptr<pg::Connection> reader_;
  std::unique_ptr<pg::Connection> writer_;  // the writer thread's only
  absl::Status fenced_;                     // the writer thread's only: why commits stopped
  std::thread lease_thread_;                // LeaseLoop
  std::thread lease_watch_;                 // WatchLease

  // Held while `lost_` runs, and by Disarm: no callback outlives Disarm.
  absl::Mutex callback_mu_ ABSL_ACQUIRED_BEFORE(lease_mu_);
  mutable absl::Mutex lease_mu_;
  int64_t version_ ABSL_GUARDED_BY(lease_mu_) = 0;  // of the lease held; 0: none
  std::chrono::steady_clock::time_point renewed_at_ ABSL_GUARDED_BY(lease_mu_);
  Owner owner_ ABSL_GUARDED_BY(lease_mu_);  // when another holds the lease
  std::function<void(const absl::Status&)> lost_ ABSL_GUARDED_BY(lease_mu_);
  absl::Status lost_status_ ABSL_GUARDED_BY(lease_mu_);  // why the lease was lost
  bool lease_stop_ ABSL_GUARDED_BY(lease_mu_) = false;
};

class PostgresMembershipImpl final : public PostgresMembership {
 public:
  PostgresMembershipImpl(PostgresStoreOptions options, std::string password)
      : options_(std::move(options)), password_(std::move(password)) {}

  absl::Status Open() {
    if (absl::Status s = Reconnect(); !s.ok()) return s;
    absl::StatusOr<MetaValues> meta = CreateSchema(*conn_, options_);
    if (!meta.ok()) return meta.status();
    absl::StatusOr<PostgresLayout> layout = LayoutOf(std::move(*meta), options_);
    if (!layout.ok()) return layout.status();
    partitions_ = layout->partitions;
    return absl::OkStatus();
  }

  int32_t partitions() const override { return partitions_; }

  absl::StatusOr<int32_t> Beat(const std::string& address) override {
    if (absl::Status s = Reconnect(); !s.ok()) return s;
    absl::Status s = conn_->Run(
        "INSERT INTO taskmaster.masters(id, address, expires_at) "
        "VALUES($1, $2, now() + $3 * interval '1 millisecond') ON CONFLICT (id) DO UPDATE SET "
        "address = EXCLUDED.address, expires_at = EXCLUDED.expires_at",
        {options_.master_id, address, Ms(options_.lease_ms)});
    if (!s.ok()) return s;
    // Masters long gone leave no rows behind (a row per process start).
    s = conn_->Run("DELETE FROM taskmaster.masters WHERE expires_at < now() - interval '1 hour'");
    if (!s.ok()) return s;
    absl::StatusOr<pg::Result> live =
        conn_->Exec("SELECT count(*) FROM taskmaster.masters WHERE expires_at >= now()");
    if (!live.ok()) return live.status();
    return static_cast<int32_t>(std::max<int64_t>(1, live->int64(0, 0)));
  }

  void Leave() override {
    if (!Reconnect().ok()) return;
    conn_->Run("DELETE FROM taskmaster.masters WHERE id = $1", {options_.master_id}).IgnoreError();
  }

 private:
  absl::Status Reconnect() {
    if (conn_ && conn_->ok()) return absl::OkStatus();
    absl::StatusOr<std::unique_ptr<pg::Connection>> fresh =
        pg::Connection::Open(options_.conninfo, password_, SessionName(options_.master_id),
                             std::chrono::milliseconds(options_.connect_timeout_ms));
    if (!fresh.ok()) return fresh.status();
    conn_ = std::move(*fresh);
    return absl::OkStatus();
  }

  const PostgresStoreOptions options_;
  const std::string password_;
  int32_t partitions_ = 1;
  std::unique_ptr<pg::Connection> conn_;  // one thread at a time: the caller's
};

absl::StatusOr<std::string> ReadPassword(const PostgresStoreOptions& options) {
  if (absl::Status s = pg::RefusePasswordIn(options.conninfo); !s.ok()) return s;
  std::string password;
  if (!options.password_file.empty()) {
    absl::StatusOr<std::string> read = ReadWholeFile(options.password_file);
    if (!read.ok()) return read.status();
    password = *read;
    while (!password.empty() && (password.back() == '\n' || password.back() == '\r')) {
      password.pop_back();
    }
  }
  return password;
}

// An `Impl` with the password, once its Open connected.
template <typename Impl>
absl::StatusOr<std::unique_ptr<Impl>> OpenImpl(const PostgresStoreOptions& options) {
  absl::StatusOr<std::string> password = ReadPassword(options);
  if (!password.ok()) return password.status();
  auto opened = std::make_unique<Impl>(options, std::move(*password));
  if (absl::Status s = opened->Open(); !s.ok()) return s;
  return opened;
}

}  // namespace

absl::StatusOr<std::unique_ptr<PostgresStore>> OpenPostgresStore(
    const PostgresStoreOptions& options) {
  return OpenImpl<PostgresStoreImpl>(options);
}

absl::StatusOr<std::unique_ptr<PostgresMembership>> OpenPostgresMembership(
    const PostgresStoreOptions& options) {
  return OpenImpl<PostgresMembershipImpl>(options);
}

std::string RedactedConninfo(const std::string& conninfo) { return pg::Redacted(conninfo); }

}  // namespace taskmaster
