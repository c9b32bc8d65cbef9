// The training loop (see trainer.h): the phases of launch/train_session.h in order, around the
// step loop. Everything device-specific is behind the StepRunner.
#include "launch/trainer.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "launch/signals.h"
#include "launch/train_session.h"
#include "runtime/error.h"

namespace peerless {

int run_training(RunConfig cfg, const TrainOptions& options, Comm& comm) {
  TrainSession s(std::move(cfg), options, comm);
  if (!setup_session(s)) return 0;  // a dry run ends after the accounting
  prepare_run_directory(s);
  const std::unique_ptr<StepRunner> runner = make_step_runner(s);
  resume_session(s, runner->exact());
  runner->start();
  begin_training(s);

  const StopSignals stop_signals;
  const TrainSection& train = s.cfg.train;
  const std::vector<int64_t> branch_steps = train.branch_step_list();
  const int64_t last_step = train.last_step();  // train.stop_step, else max_steps (the schedule's length)
  for (int64_t step = s.start_step + 1; step <= last_step; ++step) {
    PL_ASSERT(s.loader->step() == step);
    const CommSnapshot before = comm_snapshot(s);
    const StepResult r = runner->step(step);
    account_step(s, step, r, before);
    const StopFlags stop = agree_on_stop(s);
    const bool last = step == last_step || stop.time_limit;
    const bool eval_now = !last && train.eval_every > 0 && step % train.eval_every == 0;
    if (step % train.log_every == 0 || eval_now || last) log_progress(s, *runner, step, r, eval_now);
    const bool by_steps = (s.cfg.checkpoint.every_steps > 0 && step % s.cfg.checkpoint.every_steps == 0) ||
                          std::binary_search(branch_steps.begin(), branch_steps.end(), step);
    if (stop.signal != 0 || stop.checkpoint_due || by_steps) {
      const std::string dir = save_checkpoint(s, *runner, step);
      if (stop.signal != 0) {
        report_signal_stop(s, stop.signal, step, dir);
        return 0;
      }
    }
    if (stop.time_limit) {
      if (s.lead)
        std::printf("time limit of %.1f minutes reached after step %lld\n", train.time_limit_minutes,
                    static_cast<long long>(step));
      break;
    }
  }
  finish_session(s, *runner, std::chrono::duration<double>(TrainSession::Clock::now() - s.t_start).count());
  return 0;
}

}  // namespace peerless
