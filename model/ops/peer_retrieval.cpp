// CPU reference of PEER product-key retrieval (SPEC §3). The arithmetic is the two sub-key score
// matrices, (tokens·heads, n) each, one gemm apiece; the rest is small per-(token, head) top-ks,
// independent of each other, so they parallelise over (token, head) pairs and the result does not
// depend on the thread count.
//
// Why product keys find the true top-k: if (a, b) is among the k best of all n² sums, then a is
// among the k best of q₁·C (otherwise k better a′ would give k sums (a′, b) ranking before (a, b)),
// and likewise b; so the k² candidates contain the answer. The same argument holds with ties
// broken by lower index, as long as the sums are exact.
#include "model/ops/peer_retrieval.h"

#include <algorithm>
#include <vector>

#include "model/ops/peer_detail.h"
#include "model/ops/row_math.h"
#include "runtime/error.h"

namespace peerless {

const char* peer_gemm_math_name(PeerGemmMath m) {
  switch (m) {
    case PeerGemmMath::fp32:
      return "fp32";
    case PeerGemmMath::tf32x3:
      return "tf32x3";
    case PeerGemmMath::tf32:
      return "tf32";
    case PeerGemmMath::bf16:
      return "bf16";
  }
  return "?";
}

PeerGemmMath parse_peer_gemm_math(const char* what, const std::string& name) {
  for (const PeerGemmMath m : {PeerGemmMath::fp32, PeerGemmMath::tf32x3, PeerGemmMath::tf32, PeerGemmMath::bf16})
    if (name == peer_gemm_math_name(m)) return m;
  throw_error(ErrorKind::config, cat(what, " must be fp32, tf32x3, tf32 or bf16 (got \"", name, "\")"), __FILE__,
              __LINE__);
}

void validate(const PeerRetrievalShape& s) {
  PL_CHECK(s.tokens >= 0, config, "peer retrieval: tokens must be >= 0 (got ", s.tokens, ")");
  PL_CHECK(s.heads >= 1, config, "peer retrieval: heads must be >= 1 (got ", s.heads, ")");
  PL_CHECK(s.key_dim >= 2 && s.key_dim % 2 == 0, config,
           "peer retrieval: key_dim must be even and >= 2, it is split into two halves (got ", s.key_dim, ")");
  PL_CHECK(s.n_sub >= 1 && s.n_sub <= 46340, config,
           "peer retrieval: n_sub must be in [1, 46340] so that n_sub² expert ids fit int32 (got ", s.n_sub, ")");
  PL_CHECK(s.k >= 1 && s.k <= s.n_sub, config, "peer retrieval: k must be in [1, n_sub] (got k=", s.k,
           ", n_sub=", s.n_sub, ")");
}

namespace {

template <typename T>
struct Candidate {
  T score;
  int32_t id;
};

template <typename T>
void retrieval_impl(const PeerRetrievalShape& s, const T* q, const T* c1, const T* c2, int32_t* ids, T* scores) {
  validate(s);
  const int64_t n = s.n_sub, half = s.key_dim / 2, k = s.k, pairs = s.tokens * s.heads;
  if (pairs == 0) return;
  // (tokens, heads, n) sub-key scores of each half of the query.
  std::vector<T> s1(static_cast<size_t>(pairs * n)), s2(static_cast<size_t>(pairs * n));
  if (s.keys == PeerKeySharing::shared) {
    // Shared tables: all (token, head) queries are the rows of one (tokens·heads, key_dim) matrix.
    detail::peer_gemm(Trans::no, Trans::yes, pairs, n, half, q, s.key_dim, c1, half, T(0), s1.data(), n);
    detail::peer_gemm(Trans::no, Trans::yes, pairs, n, half, q + half, s.key_dim, c2, half, T(0), s2.data(), n);
  } else {
    const int64_t ld_q = s.heads * s.key_dim, ld_s = s.heads * n;
    for (int64_t h = 0; h < s.heads; ++h) {
      detail::peer_gemm(Trans::no, Trans::yes, s.tokens, n, half, q + h * s.key_dim, ld_q, c1 + h * n * half, half,
                        T(0), s1.data() + h * n, ld_s);
      detail::peer_gemm(Trans::no, Trans::yes, s.tokens, n, half, q + h * s.key_dim + half, ld_q, c2 + h * n * half,
                        half, T(0), s2.data() + h * n, ld_s);
    }
  }

#pragma omp parallel if (pairs * n >= detail::kParallelMin)
  {
    std::vector<int32_t> best, top1(static_cast<size_t>(k)), top2(static_cast<size_t>(k));
    std::vector<Candidate<T>> cand(static_cast<size_t>(k * k));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; ++p) {
      const T* r1 = s1.data() + p * n;
      const T* r2 = s2.data() + p * n;
      detail::topk_indices(r1, n, k, top1.data(), best);
      detail::topk_indices(r2, n, k, top2.data(), best);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j)
          cand[i * k + j] = {r1[top1[i]] + r2[top2[j]], static_cast<int32_t>(top1[i] * n + top2[j])};
      std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), [](const Candidate<T>& a, const Candidate<T>& b) {
        return detail::ranks_before(a.score, a.id, b.score, b.id);
      });
      for (int64_t j = 0; j < k; ++j) {
        ids[p * k + j] = cand[j].id;
        scores[p * k + j] = cand[j].score;
      }
    }
  }
}

}  // namespace

void peer_retrieval_cpu(const PeerRetrievalShape& s, const float* q, const float* sub_keys1, const float* sub_keys2,
                        int32_t* ids, float* scores) {
  retrieval_impl(s, q, sub_keys1, sub_keys2, ids, scores);
}
void peer_retrieval_cpu(const PeerRetrievalShape& s, const double* q, const double* sub_keys1,
                        const double* sub_keys2, int32_t* ids, double* scores) {
  retrieval_impl(s, q, sub_keys1, sub_keys2, ids, scores);
}

void peer_retrieval_bruteforce_cpu(const PeerRetrievalShape& s, const double* q, const double* sub_keys1,
                                   const double* sub_keys2, int32_t* ids, double* scores) {
  PeerRetrievalShape v = s;
  v.k = 1;  // validate everything but k, which may go up to N here
  validate(v);
  const int64_t n = s.n_sub, N = n * n, half = s.key_dim / 2, k = s.k;
  PL_CHECK(k >= 1 && k <= N, config, "peer retrieval brute force: k must be in [1, n_sub²] (got ", k, ")");
  const int64_t pairs = s.tokens * s.heads;
#pragma omp parallel
  {
    std::vector<double> d1(static_cast<size_t>(n)), d2(static_cast<size_t>(n)), all(static_cast<size_t>(N));
    std::vector<int32_t> idx;
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t h = p % s.heads;
      const double* qp = q + p * s.key_dim;
      const double* t1 = s.keys == PeerKeySharing::shared ? sub_keys1 : sub_keys1 + h * n * half;
      const double* t2 = s.keys == PeerKeySharing::shared ? sub_keys2 : sub_keys2 + h * n * half;
      for (int64_t a = 0; a < n; ++a) {
        double acc1 = 0, acc2 = 0;
        for (int64_t i = 0; i < half; ++i) {
          acc1 += qp[i] * t1[a * half + i];
          acc2 += qp[half + i] * t2[a * half + i];
        }
        d1[a] = acc1;
        d2[a] = acc2;
      }
      // Every key: q·[c_a | c′_b] = q₁·c_a + q₂·c′_b, at index a·n + b.
      for (int64_t a = 0; a < n; ++a)
        for (int64_t b = 0; b < n; ++b) all[a * n + b] = d1[a] + d2[b];
      // A different selection algorithm from the product-key path's (nth_element, then sort), so the
      // two do not share a bug.
      idx.resize(static_cast<size_t>(N));
      for (int64_t i = 0; i < N; ++i) idx[i] = static_cast<int32_t>(i);
      auto before = [&all](int32_t a, int32_t b) { return detail::ranks_before(all[a], a, all[b], b); };
      if (k < N) std::nth_element(idx.begin(), idx.begin() + k, idx.end(), before);
      std::sort(idx.begin(), idx.begin() + k, before);
      for (int64_t j = 0; j < k; ++j) {
        ids[p * k + j] = idx[j];
        scores[p * k + j] = all[idx[j]];
      }
    }
  }
}

}  // namespace peerless
