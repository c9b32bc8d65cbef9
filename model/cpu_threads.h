// How many CPU threads the ops use (OpenMP loops and OpenBLAS products alike).
#pragma once

namespace peerless {

// n > 0: use n threads; otherwise keep the default (all cores).
void set_cpu_threads(int n);
int cpu_threads();

}  // namespace peerless
