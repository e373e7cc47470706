// wordcount-worker: taskworker's flags and config, plus a kind of its own. The payload is text;
// the result is how many words it holds. Run: wordcount-worker --master HOST:7070 --token-file F
#include <taskmaster/worker.h>

#include <cctype>
#include <string>

absl::StatusOr<std::string> WordCount(const taskmaster::TaskContext& ctx) {
  const std::string_view text = ctx.payload();
  size_t words = 0;
  bool in_word = false;
  for (size_t i = 0; i < text.size(); ++i) {
    if (i % 65536 == 0) {
      if (ctx.ShouldStop()) return absl::CancelledError("stopped");  // cancelled or timed out
      ctx.ReportProgress(static_cast<int64_t>(i), static_cast<int64_t>(text.size()));
    }
    const bool space = std::isspace(static_cast<unsigned char>(text[i]));
    if (!space && !in_word) ++words;
    in_word = !space;
  }
  return std::to_string(words);
}

int main(int argc, char** argv) {
  taskmaster::Registry registry;
  if (absl::Status s = registry.Register("wordcount", WordCount); !s.ok()) return 2;
  return taskmaster::RunWorker(argc, argv, std::move(registry));
}
