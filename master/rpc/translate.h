#pragma once

// The services' requests in broker terms: what a client's submit and a worker's stream messages
// become. Kept apart from the gRPC plumbing so the fuzz targets (tests/fuzz) drive the broker
// exactly as the services do.

#include <cstdint>
#include <vector>

#include "master/core/broker.h"
#include "master/core/task.h"
#include "taskmaster/v1/taskmaster.pb.h"

namespace taskmaster {

// Moves the strings out of `p` instead of copying them: payloads can be large.
TaskSpec FromProto(v1::TaskSpec& p);
WorkerHello FromProto(v1::Hello& p);

// The request is the call's until it finishes: move the payloads out instead of copying them.
std::vector<TaskSpec> TakeSpecs(const v1::SubmitRequest* request);
SubmitTarget TargetOf(const v1::SubmitRequest& request);

// Applies one message of an attached worker's stream to the broker: its results with the credits
// that ride along (or the credits alone), its heartbeat, its drain. Returns the heartbeat time to
// echo back to the worker, 0 for none. `bye` is the stream's to remember.
int64_t ApplyWorkerMessage(Broker& broker, const Broker::WorkerHandle& worker,
                           v1::WorkerMessage& m);

// The broker's views as the API shows them. ToProto(TaskView&) moves its strings out.
v1::TaskState ToProto(TaskState s);
void ToProto(TaskView& v, v1::TaskInfo* p);
void ToProto(const JobView& v, v1::JobInfo* p);
void ToProto(const WorkerView& v, v1::WorkerInfo* p);
void ToProto(const QueueStatsView& v, v1::QueueStats* p);
void ToProto(const TaskProgress& v, v1::TaskProgress* p);
void AddRefs(const std::vector<TaskRef>& refs,
             google::protobuf::RepeatedPtrField<v1::TaskRef>* out);

}  // namespace taskmaster
