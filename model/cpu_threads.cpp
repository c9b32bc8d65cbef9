// One knob for both thread pools, so that OpenMP loops and BLAS products never oversubscribe.
#include "model/cpu_threads.h"

#include <omp.h>

extern "C" void openblas_set_num_threads(int);

namespace peerless {

void set_cpu_threads(int n) {
  if (n <= 0) return;
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

int cpu_threads() { return omp_get_max_threads(); }

}  // namespace peerless
