// The writing side of one worker stream (see worker_outbox.h).
#include "master/rpc/worker_outbox.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "master/rpc/translate.h"

namespace taskmaster {

StreamStep WorkerOutbox::Add(WorkerOutbound message) {
  if (ending()) return {};  // nothing more for a stream that is ending
  if (queue_.empty()) queue_.emplace_back();
  v1::MasterMessage* out = &queue_.back().message;
  if (message.welcome) {
    v1::Welcome* w = out->mutable_welcome();
    w->set_master_epoch(message.welcome->master_epoch);
    w->set_heartbeat_interval_ms(message.welcome->heartbeat_interval_ms);
    w->set_lease_timeout_ms(message.welcome->lease_timeout_ms);
    w->set_echoes_heartbeats(true);  // see WorkerStream::Handle
    w->set_worker_secret(message.welcome->secret);
    w->set_partitions(message.welcome->partitions);
    AddRefs(message.welcome->revoked, w->mutable_revoked());
  }
  for (LeasedTask& t : message.tasks) {
    if (queue_.back().bytes >= kBatchBytes) {
      queue_.emplace_back();
      out = &queue_.back().message;
    }
    queue_.back().bytes += t.payload.size() + kItemOverheadBytes;
    buffered_bytes_ += t.payload.size() + kItemOverheadBytes;
    v1::Task* p = out->add_tasks();
    p->set_task_id(t.id);
    p->set_attempt(t.attempt);
    p->set_kind(std::move(t.kind));
    p->set_payload(std::move(t.payload));
    p->set_timeout_ms(t.timeout_ms);
    p->set_queue(std::move(t.queue));
  }
  for (TaskId id : message.cancel) out->add_cancel(id);
  AddRefs(message.acked, out->mutable_acked());
  if (message.shutting_down) out->set_shutting_down(true);
  out->set_heartbeat_echo(std::max(out->heartbeat_echo(), message.heartbeat_echo));
  // A worker that does not read its stream holds tasks it does not run (dispatch keeps what is
  // sent to one far below the limit, so a worker that reads never reaches it); cut it off rather
  // than buffer for it without bound, or let it keep its tasks by heartbeats alone. Its leases
  // lapse as for any lost worker. The write it never takes ends with the call; the Finish
  // deferred for it follows then.
  const bool stalled = writing_now_ && now_() - write_started_ > stall_;
  if (buffered_bytes_ > max_buffered_bytes_ || stalled) {
    StreamStep step =
        Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                            absl::StrCat("the worker does not read its stream: ", buffered_bytes_,
                                         " bytes wait for it")));
    step.cut_off = true;
    return step;
  }
  return WriteNext();
}

StreamStep WorkerOutbox::WriteDone(bool ok) {
  writing_now_ = false;
  buffered_bytes_ -= writing_bytes_;
  writing_bytes_ = 0;
  if (finish_pending_) {
    std::optional<grpc::Status> status = std::move(finish_pending_);
    finish_pending_.reset();
    return Finish(std::move(*status));
  }
  if (!ok) return {};  // the read side sees the broken stream and finishes
  return WriteNext();
}

StreamStep WorkerOutbox::Finish(grpc::Status status) {
  if (finished_ || finish_pending_) return {};
  if (writing_now_) {
    finish_pending_ = std::move(status);
    return {};
  }
  finished_ = true;
  StreamStep step;
  step.finish = std::move(status);
  return step;
}

StreamStep WorkerOutbox::WriteNext() {
  if (writing_now_ || finished_ || queue_.empty()) return {};
  writing_ = std::move(queue_.front().message);
  writing_bytes_ = queue_.front().bytes;
  queue_.pop_front();
  writing_now_ = true;
  write_started_ = now_();
  StreamStep step;
  step.write = &writing_;
  return step;
}

}  // namespace taskmaster
