// Scaling-law fits for `peerless fit` (SWEEPS.md §4). Approach 3 (Chinchilla, arXiv 2203.15556
// App. D.2): L(N, D) = E + A/N^α + B/D^β fitted by minimising the summed Huber loss of
// LSE(a − α ln N, b − β ln D, e) − ln L with L-BFGS from a 4,500-point grid of starts. Approach 2
// (§3.2): a parabola in ln N (and ln D) per compute budget, then OLS of the vertices against ln C.
// Both come with bootstrap intervals (launch/fit_bootstrap.cpp). Nothing here reads files.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace peerless {

inline constexpr const char* kFitterVersion = "peerless-fit 1";

// One finished run: N parameters, D training tokens, final validation loss, and its compute
// C (by the chosen FLOPs definition) and nominal budget (0 when unknown).
struct ScalingPoint {
  double n = 0, d = 0, loss = 0;
  double c = 0, budget = 0;
};

// θ in log space: A = e^a, B = e^b, E = e^e.
struct Theta {
  double a = 0, b = 0, e = 0, alpha = 0, beta = 0;
  double A() const;
  double B() const;
  double E() const;
  double loss(double n, double d) const;  // E + A/N^α + B/D^β
  // Compute-optimal allocation for C = 6ND: N_opt = G (C/6)^a_n, D_opt = (C/6)^b_d / G.
  double exponent_n() const { return beta / (alpha + beta); }   // a
  double exponent_d() const { return alpha / (alpha + beta); }  // b
  double G() const;
};

struct Approach3Options {
  double delta = 1e-3;  // Huber threshold
  double scale = 1.0;   // objective multiplier: 1 = summed (the spec), 1/n = mean
  int max_iters = 15000;
  double grad_tol = 1e-7;
};

// Σ scale·Huber_δ(LSE(a − α ln N, b − β ln D, e) − ln L); `grad` (5 values, θ order a, b, e, α, β)
// receives the analytic gradient when non-null.
double approach3_objective(const std::vector<ScalingPoint>& pts, const Theta& t, const Approach3Options& o,
                           double* grad);

struct Approach3Fit {
  Theta theta;
  double objective = 0;
  int iterations = 0;      // of the winning start
  bool converged = false;  // the winning start met the gradient test
  int starts = 0;
  std::vector<std::string> box_flags;  // parameters at or outside the start box ("alpha=2.31 > 2")
};

// The 4,500 starts: α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}.
std::vector<Theta> approach3_grid();
// Minimises from every start and keeps the lowest objective (OpenMP over starts; deterministic).
Approach3Fit fit_approach3(const std::vector<ScalingPoint>& pts, const std::vector<Theta>& starts,
                           const Approach3Options& o = {});
Approach3Fit fit_approach3(const std::vector<ScalingPoint>& pts, const Approach3Options& o = {});

// Compute-optimal N for budget C under FLOPs per token f(N) (log–log interpolated through `ladder`
// (N, flops per token) pairs): argmin_N L̂(N, C/f(N)). With an empty ladder, C = 6ND (closed form).
struct FlopsLadder {
  std::vector<double> ln_n, ln_f;  // sorted by ln_n, unique
  bool empty() const { return ln_n.empty(); }
  double flops_per_token(double n) const;
};
FlopsLadder make_ladder(const std::vector<ScalingPoint>& pts);  // f_i = C_i / D_i
double optimal_n(const Theta& t, double c, const FlopsLadder& ladder);
double optimal_d(const Theta& t, double c, const FlopsLadder& ladder);

// ---- Approach 2 -------------------------------------------------------------------------------

struct Parabola {
  double p0 = 0, p1 = 0, p2 = 0;
  double at(double x) const { return p0 + x * (p1 + x * p2); }
};
Parabola fit_parabola(const std::vector<double>& x, const std::vector<double>& y);  // least squares

// One budget's isoFLOP curve: points grouped by nominal budget, actual C within 2%.
struct IsoflopBudget {
  double budget = 0;
  std::vector<int> members;  // indices into the point list
  bool ok = false;
  std::string skip_reason;  // when !ok
  Parabola in_ln_n, in_ln_d;
  double n_star = 0, d_star = 0, loss_star = 0;
};

struct Approach2Fit {
  std::vector<IsoflopBudget> budgets;
  std::vector<std::string> notes;  // points dropped, budgets skipped
  bool ok = false;                 // ≥ 3 usable budgets
  double a = 0, ln_k_n = 0;        // ln N* = ln k_n + a ln C
  double b = 0, ln_k_d = 0;        // ln D* = ln k_d + b ln C
};

// Groups the points by nominal budget; points without one, or off it by more than 2%, are left out
// with a note.
std::vector<IsoflopBudget> group_budgets(const std::vector<ScalingPoint>& pts, std::vector<std::string>* notes);
// Fits every budget (members may repeat: a bootstrap replicate). `min_sizes` distinct sizes per
// budget: 5 on the data; a replicate resampled within budgets needs only 3 (a parabola's worth),
// since resampling 5 sizes keeps all 5 in only 4% of draws.
Approach2Fit fit_approach2(const std::vector<ScalingPoint>& pts, std::vector<IsoflopBudget> budgets, int min_sizes = 5);

// Slope and intercept of y = k + s x by least squares.
void ols_line(const std::vector<double>& x, const std::vector<double>& y, double* intercept, double* slope);

}  // namespace peerless
