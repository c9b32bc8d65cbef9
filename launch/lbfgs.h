// A small dense L-BFGS minimiser for the scaling-law fits (launch/fit.cpp). Stopping is scale-free:
// ||g|| <= grad_tol * ||g0|| or max_iters, so multiplying the objective by a constant (summed vs mean
// loss) changes nothing. The first step has unit length along -g and later steps use the usual
// s'y / y'y initial scaling; the line search is a bisection weak-Wolfe search, which needs only a
// continuous gradient (the Huber loss is C1, not C2).
#pragma once

#include <functional>
#include <vector>

namespace peerless {

struct LbfgsOptions {
  int max_iters = 15000;
  double grad_tol = 1e-7;  // relative to the gradient norm at the start
  int memory = 10;
};

struct LbfgsResult {
  double f = 0;
  int iterations = 0;
  bool converged = false;  // the gradient test held (not the iteration cap or a stalled line search)
};

// Objective: returns f(x) and writes the gradient into g (same size as x).
using Objective = std::function<double(const std::vector<double>& x, std::vector<double>& g)>;

// Minimises f from x (updated in place).
LbfgsResult lbfgs_minimize(const Objective& f, std::vector<double>& x, const LbfgsOptions& options = {});

}  // namespace peerless
