// The subcommand table of the `peerless` binary. Each subcommand lives in launch/cmd_<name>.cpp,
// takes its arguments (without the subcommand name) and returns the process exit status. Errors
// are thrown as peerless::Error and reported by main.
#pragma once

#include <string>
#include <vector>

namespace peerless {

using Args = std::vector<std::string>;

int cmd_prepare(const Args& args);
int cmd_train(const Args& args);
int cmd_finetune(const Args& args);  // launch/cmd_train.cpp
int cmd_eval(const Args& args);
int cmd_tasks(const Args& args);
int cmd_sample(const Args& args);
int cmd_inspect(const Args& args);
int cmd_export(const Args& args);
int cmd_import(const Args& args);
int cmd_merge(const Args& args);  // launch/cmd_merge.cpp
int cmd_generate(const Args& args);
int cmd_bench(const Args& args);
int cmd_fit(const Args& args);   // launch/cmd_fit.cpp
int cmd_plot(const Args& args);  // launch/cmd_plot.cpp
int cmd_sweep(const Args& args);  // launch/cmd_sweep.cpp
int cmd_coordcheck(const Args& args);  // launch/cmd_coordcheck.cpp
int bench_checkpoint(const Args& args);  // `bench checkpoint`, launch/bench_checkpoint.cpp
int bench_peer(const Args& args);        // `bench peer`, launch/bench_peer.cpp
int bench_ops(const Args& args);         // `bench ops`, launch/bench_ops.cpp
int bench_infer(const Args& args);       // `bench infer`, launch/bench_infer.cpp
int bench_train(const Args& args);       // `bench train`, launch/bench_train.cu (CUDA builds)
int bench_peer_layer(const Args& args);
int bench_attention(const Args& args);   // `bench attention`, launch/bench_attention.cu (CUDA builds)  // `bench peer-layer`, launch/bench_peer_layer.cu (CUDA builds)

}  // namespace peerless
