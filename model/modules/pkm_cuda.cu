// The PKM channel mixer's CUDA half (model/cuda_module.h; the CPU half is pkm_mixer.cpp): the
// pre-norm, PEER's query half on the device (peer_query_*_cuda: projection, BatchNorm, product-key
// top-k, softmax gates; a PeerLayerCuda holding the query half only), the value bag
// (model/ops/pkm_values.h), then the residual add. The value gradient is dense-accumulated into the
// flat gradient (each retrieved row summed in token order, no atomics), as the CPU adds its sparse
// value gradient into the dense one. BatchNorm statistics as in peer_cuda.cu: a training forward
// blends the batch's into buffers of this module with momentum 1, the backward adds them into the
// statistics' gradient slots, CudaModel::update_buffers makes the running statistics from them; a
// forward alone (evaluation) normalises with the running statistics.
// With the value table sharded by rows over the expert group (parallel.expert_parallel > 1,
// Model::experts_sharded()) the bag runs through ShardedPkmValuesCuda (model/pkm_values_parallel.h):
// each entry (local row, gate) goes to the rank owning its row, which returns one partial row per
// (token, owner) in the forward and each entry's dgate in the backward, and dense-accumulates its rows'
// gradient into its slice of the flat gradient (each row's entries in (sender rank, token) order).
// The query half stays replicated, as on the CPU.
#include "model/cuda_module.h"
#include "model/modules/pkm_mixer.h"
#include "model/ops/peer_layer.h"
#include "model/ops/pkm_values.h"
#include "model/ops/rmsnorm.h"
#include "model/pkm_values_parallel.h"

namespace peerless {

namespace {

enum Slot { s_xn, s_out, s_dxn, s_dgates, s_dscores, s_values_ws };

// The parameters of a pkm block, by name (the CPU half records only its norm in BlockParams).
struct PkmParams {
  int norm = -1, wq = -1, gamma = -1, beta = -1, mean = -1, var = -1, keys1 = -1, keys2 = -1, values = -1;
  PkmParams(const ParamLayout& L, const BlockParams& b, int64_t layer)
      : norm(b.mlp_norm),
        wq(block_param(L, layer, "pkm/query/weight")),
        gamma(block_param(L, layer, "pkm/query_bn/gamma")),
        beta(block_param(L, layer, "pkm/query_bn/beta")),
        mean(block_param(L, layer, "pkm/query_bn/running_mean")),
        var(block_param(L, layer, "pkm/query_bn/running_var")),
        keys1(block_param(L, layer, "pkm/sub_keys1")),
        keys2(block_param(L, layer, "pkm/sub_keys2")),
        values(block_param(L, layer, "pkm/values")) {}
};

// What the device kernels take, as config errors naming the keys.
void check_supported(const PeerLayerShape& s) {
  PL_CHECK(s.k <= kPeerRetrievalCudaMaxK, config, "run.device = \"cuda\": model.pkm_topk = ", s.k,
           " exceeds the GPU retrieval's ", kPeerRetrievalCudaMaxK, "; use a smaller k or run.device = \"cpu\"");
  PL_CHECK(s.heads * s.k <= kPeerQueryCudaMaxEntries, config,
           "run.device = \"cuda\": model.pkm_heads · model.pkm_topk = ", s.heads, " · ", s.k,
           " exceeds the GPU query backward's ", kPeerQueryCudaMaxEntries,
           " entries per token; use fewer heads or a smaller k, or run.device = \"cpu\"");
}

PkmValuesShape values_shape(const PeerLayerShape& s) { return {s.tokens, s.dim, s.heads, s.k, s.n_sub * s.n_sub}; }

class PkmCuda final : public CudaModule {
 public:
  PkmCuda(CudaContext& g, const CudaModuleBuild& b)
      : module_(b.module), p_(g.layout, b.block, b.layer), d_(g.host.config().d_model) {
    const int64_t M = g.max_tokens;
    const PeerLayerShape ps = pkm_module_shape(module_, M);
    check_supported(ps);
    const int64_t C = ps.channels(), E = M * ps.heads * ps.k;
    rstd_.resize(M, g.bytes);
    mean_.resize(C, g.bytes);
    var_.resize(C, g.bytes);
    // The query blends into these with momentum 1, (1 − 1)·old + batch: old must not be NaN.
    if (!device_counting()) {
      PL_CUDA_CHECK(cudaMemset(mean_.get(), 0, sizeof(float) * C));
      PL_CUDA_CHECK(cudaMemset(var_.get(), 0, sizeof(float) * C));
    }
    for (int slot : {s_xn, s_out, s_dxn}) g.reserve(slot, sizeof(float) * M * d_);
    for (int slot : {s_dgates, s_dscores}) g.reserve(slot, sizeof(float) * E);
    const DeviceUseScope use(DeviceUse::experts);
    query_ = std::make_unique<PeerLayerCuda>(ps, PeerLayerParts::query);
    g.bytes += static_cast<int64_t>(query_->device_bytes());
    if (g.host.experts_sharded()) {  // the owner side and the exchange's lists, planned as the experts'
      PL_CHECK(g.host.expert_comm() != nullptr, internal, "a sharded PKM model needs set_expert_comm()");
      shard_ = std::make_unique<ShardedPkmValuesCuda>(*g.host.expert_comm(), values_shape(ps), b.peer_round_tokens);
      g.bytes += static_cast<int64_t>(shard_->device_bytes());
    } else {
      g.reserve(s_values_ws, static_cast<int64_t>(pkm_values_backward_workspace_bytes(values_shape(ps))));
    }
  }

  void forward(CudaContext& g, const CudaStep& s, const float* x_in, float* x_out) override {
    const int64_t M = s.tokens();
    float *xn = g.scratch<float>(s_xn), *out = g.scratch<float>(s_out);
    rmsnorm_forward_cuda(RmsNormShape{M, d_, g.eps}, x_in, g.P(p_.norm), xn, rstd_.get(), g.stream);
    g.tick(ph_other);
    const PeerLayerShape ps = shape(M);
    if (s.train)
      peer_query_forward_cuda(ps, PeerNormMode::train, params(g, mean_.get(), var_.get()), xn, *query_, g.stream);
    else
      peer_query_forward_cuda(ps, PeerNormMode::eval, params(g, g.P(p_.mean), g.P(p_.var)), xn, *query_, g.stream);
    if (shard_) {
      shard_->set_values(g.P(p_.values), g.G(p_.values));
      shard_->forward(values_shape(ps), query_->ids, query_->gates, out, g.stream);
    } else {
      pkm_values_forward_cuda(values_shape(ps), query_->ids, query_->gates, g.P(p_.values), out, g.stream);
    }
    g.tick(ph_peer_layer);
    add2_cuda(x_out, x_in, out, M * d_, g.stream);
  }

  void backward(CudaContext& g, const CudaStep& s, const float* x_in, float* dx) override {
    const int64_t M = s.tokens();
    float *xn = g.scratch<float>(s_xn), *dxn = g.scratch<float>(s_dxn);
    float *dgates = g.scratch<float>(s_dgates), *dscores = g.scratch<float>(s_dscores);
    const RmsNormShape nd{M, d_, g.eps};
    rmsnorm_forward_cuda(nd, x_in, g.P(p_.norm), xn, rstd_.get(), g.stream);  // xn recomputed
    g.tick(ph_other);
    const PeerLayerShape ps = shape(M);
    values_backward(g, values_shape(ps), dx, dgates);
    peer_softmax_gates_backward_cuda(M * ps.heads, ps.k, query_->gates, dgates, dscores, g.stream);
    // The output depends on the normed input through the query only.
    PL_CUDA_CHECK(cudaMemsetAsync(dxn, 0, sizeof(float) * M * d_, g.stream));
    PeerLayerGradsCuda pg;
    pg.w_q = g.G(p_.wq);
    pg.bn_gamma = g.G(p_.gamma);
    pg.bn_beta = g.G(p_.beta);
    pg.sub_keys1 = g.G(p_.keys1);
    pg.sub_keys2 = g.G(p_.keys2);
    peer_query_backward_cuda(ps, params(g, mean_.get(), var_.get()), *query_, xn, dscores, dxn, pg, g.stream);
    g.tick(ph_peer_layer);
    add_cuda(g.G(p_.mean), mean_.get(), ps.channels(), g.stream);
    add_cuda(g.G(p_.var), var_.get(), ps.channels(), g.stream);
    g.norm_backward(nd, x_in, g.P(p_.norm), rstd_.get(), dxn, dx, g.G(p_.norm), true);
  }

 private:
  // dgates and the value gradient (dense-accumulated into the flat gradient: the whole table's, or
  // this rank's rows through the exchange) from dy, the block output's gradient.
  void values_backward(CudaContext& g, const PkmValuesShape& vs, const float* dy, float* dgates) {
    if (shard_) {
      shard_->backward(vs, query_->ids, query_->gates, dy, dgates, g.stream);
      return;
    }
    PeerTableGradCuda dvalues;
    dvalues.form = PeerTableGradForm::dense_accumulate;
    dvalues.dense = g.G(p_.values);
    const size_t ws_bytes = pkm_values_backward_workspace_bytes(vs);
    pkm_values_backward_cuda(vs, query_->ids, query_->gates, g.P(p_.values), dy, dgates, dvalues,
                             g.scratch<char>(s_values_ws), ws_bytes, g.stream);
  }
  // The query's shape at M tokens; momentum 1 (see the top of this file).
  PeerLayerShape shape(int64_t M) const {
    PeerLayerShape ps = pkm_module_shape(module_, M);
    ps.bn_momentum = 1.f;
    return ps;
  }
  // The query half's parameter views (device), BatchNorm statistics as given; no table.
  PeerLayerParams<float> params(const CudaContext& g, float* mean, float* var) const {
    PeerLayerParams<float> p;
    p.w_q = g.P(p_.wq);
    p.bn_gamma = g.P(p_.gamma);
    p.bn_beta = g.P(p_.beta);
    p.bn_running_mean = mean;
    p.bn_running_var = var;
    p.sub_keys1 = g.P(p_.keys1);
    p.sub_keys2 = g.P(p_.keys2);
    return p;
  }

  const Module& module_;
  const PkmParams p_;
  const int64_t d_;
  std::unique_ptr<PeerLayerCuda> query_;
  std::unique_ptr<ShardedPkmValuesCuda> shard_;  // sharded value table only
  DevBuf<float> rstd_, mean_, var_;
};

}  // namespace

std::unique_ptr<CudaModule> make_pkm_cuda(CudaContext& g, const CudaModuleBuild& b) {
  return std::make_unique<PkmCuda>(g, b);
}

}  // namespace peerless
