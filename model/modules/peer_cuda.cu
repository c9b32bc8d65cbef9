// The PEER channel mixer's CUDA half (model/cuda_module.h; the CPU half is peer_mixer.cpp): the
// pre-norm, then model/ops/peer_layer.h's CUDA layer (fp32 or ternary experts, the deterministic
// gated expert kernels), then the residual add. With the tables sharded by rows over the expert
// group (parallel.expert_parallel > 1, Model::experts_sharded()) the experts run through
// ShardedPeerExpertsCuda (model/expert_parallel.h): each retrieved entry goes to the rank owning
// its row, over the group's Comm on device buffers; the gradient of this rank's rows is
// accumulated into its slice of the flat gradient.
//
// model.peer_ternary: the experts read the table's ternary forward copy as 2-bit packed codes (this
// rank's rows, N/P × 2d / 4 bytes beside the fp32 latent rows: 0.5 GiB at N = 1024², d = 1024) times
// one β, through the same kernels as the fp32 table (PeerTableCuda, model/ops/peer_experts.h); the
// gradient goes to the latent rows (straight through). The packed form is the only copy: the
// gathers (forward and backward, whole or row-sharded tables) decode it in registers, and download()
// unpacks it on the host. refresh() recomputes the copy after every optimizer step: Σ|W| in the
// segments Model::peer_abs_sum_segment() says, summed on the device in the CPU's order
// (segment_abs_sums_cuda), combined on the host by the same Model::peer_table_beta as the CPU's
// refresh (an all-reduce over the expert group when sharded), then the packed codes
// (ternary_codes_packed_cuda). So β and the codes are the CPU's bits from the same latent table (the
// non-deterministic sum of a table sharded over 3 or more ranks excepted: its all-reduce order is the
// backend's on both devices).
//
// BatchNorm statistics: a training forward normalises with the micro-batch's statistics and blends
// them with momentum 1 into buffers of this module; the backward adds them into the statistics'
// gradient slots, from which CudaModel::update_buffers computes the running statistics once per
// step (Model::update_buffers). A forward alone (evaluation) normalises with the running statistics.
#include "model/cuda_module.h"
#include "model/expert_parallel.h"
#include "model/ops/peer_layer.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "model/ternary_pack.h"

namespace peerless {

namespace {

enum Slot { s_xn, s_out, s_dxn };

class PeerCuda final : public CudaModule {
 public:
  PeerCuda(CudaContext& g, const CudaModuleBuild& b) : b_(b.block), d_(g.host.config().d_model), block_(b.layer) {
    // With sharded tables the exchange runs in rounds of b.peer_round_tokens (expert_parallel.h).
    const int64_t M = g.max_tokens;
    const PeerLayerShape ps = g.host.peer_shape(M);
    rstd_.resize(M, g.bytes);
    mean_.resize(ps.channels(), g.bytes);
    var_.resize(ps.channels(), g.bytes);
    // The layer blends into these with momentum 1, (1 − 1)·old + batch: old must not be NaN.
    if (!device_counting()) {
      PL_CUDA_CHECK(cudaMemset(mean_.get(), 0, sizeof(float) * ps.channels()));
      PL_CUDA_CHECK(cudaMemset(var_.get(), 0, sizeof(float) * ps.channels()));
    }
    for (int slot : {s_xn, s_out, s_dxn}) g.reserve(slot, sizeof(float) * M * d_);
    const DeviceUseScope use(DeviceUse::experts);
    layer_ = std::make_unique<PeerLayerCuda>(ps);
    layer_->blas().set_math(parse_peer_gemm_math("model.peer_gemm", g.host.config().peer_gemm));
    g.bytes += static_cast<int64_t>(layer_->device_bytes());
    if (g.host.config().peer_ternary) {
      const DeviceUseScope state(DeviceUse::state);
      const int64_t n = g.layout.at(b_.peer_table).numel;
      packed_.resize((n + 3) / 4, g.bytes);
      // Enough segment sums for either mode: one per row (deterministic) or per kAbsSumChunk.
      sums_.resize(std::max(g.host.peer_table_rows(), (n + kAbsSumChunk - 1) / kAbsSumChunk), g.bytes);
    }
    if (g.host.experts_sharded()) {
      PL_CHECK(g.host.expert_comm() != nullptr, internal, "a sharded PEER model needs set_expert_comm()");
      shard_ = std::make_unique<ShardedPeerExpertsCuda>(*g.host.expert_comm(), ps.experts(), b.peer_round_tokens);
      g.bytes += shard_->device_bytes();
    }
  }

  void forward(CudaContext& g, const CudaStep& s, const float* x_in, float* x_out) override {
    const int64_t M = s.tokens();
    float *xn = g.scratch<float>(s_xn), *out = g.scratch<float>(s_out);
    rmsnorm_forward_cuda(RmsNormShape{M, d_, g.eps}, x_in, g.P(b_.mlp_norm), xn, rstd_.get(), g.stream);
    g.tick(ph_other);
    if (shard_) shard_->set_table(expert_table(g), g.G(b_.peer_table));
    if (s.train)
      peer_layer_forward_cuda(shape(g, M), PeerNormMode::train, params(g, mean_.get(), var_.get()), xn, out, *layer_,
                              g.stream, shard_.get());
    else
      peer_layer_forward_cuda(shape(g, M), PeerNormMode::eval, params(g, g.P(b_.peer_bn_mean), g.P(b_.peer_bn_var)),
                              xn, out, *layer_, g.stream, shard_.get());
    g.tick(ph_peer_layer);
    add2_cuda(x_out, x_in, out, M * d_, g.stream);
  }

  void backward(CudaContext& g, const CudaStep& s, const float* x_in, float* dx) override {
    const int64_t M = s.tokens();
    float *xn = g.scratch<float>(s_xn), *dxn = g.scratch<float>(s_dxn);
    const RmsNormShape nd{M, d_, g.eps};
    rmsnorm_forward_cuda(nd, x_in, g.P(b_.mlp_norm), xn, rstd_.get(), g.stream);  // xn recomputed
    PeerLayerGradsCuda pg;
    pg.w_q = g.G(b_.peer_wq);
    pg.bn_gamma = g.G(b_.peer_bn_gamma);
    pg.bn_beta = g.G(b_.peer_bn_beta);
    pg.sub_keys1 = g.G(b_.peer_keys1);
    pg.sub_keys2 = g.G(b_.peer_keys2);
    pg.table.form = PeerTableGradForm::dense_accumulate;
    pg.table.dense = g.G(b_.peer_table);
    g.tick(ph_other);
    const PeerLayerShape ps = shape(g, M);
    peer_layer_backward_cuda(ps, params(g, mean_.get(), var_.get()), *layer_, xn, dx, dxn, pg, g.stream, shard_.get());
    g.tick(ph_peer_layer);
    add_cuda(g.G(b_.peer_bn_mean), mean_.get(), ps.channels(), g.stream);
    add_cuda(g.G(b_.peer_bn_var), var_.get(), ps.channels(), g.stream);
    g.norm_backward(nd, x_in, g.P(b_.mlp_norm), rstd_.get(), dxn, dx, g.G(b_.mlp_norm), true);
  }

  // model.peer_ternary: β and the codes from the latent table (see the top of this file).
  void refresh(CudaContext& g) override {
    if (!ternary() || device_counting()) return;
    const Model& host = g.host;
    const float* w = g.P(b_.peer_table);
    const int64_t n = g.layout.at(b_.peer_table).numel, seg = host.peer_abs_sum_segment();
    const int64_t n_sums = (n + seg - 1) / seg;
    PL_CHECK(n_sums <= sums_.n, internal, "PEER ternary refresh: ", n_sums, " segment sums, room for ", sums_.n);
    segment_abs_sums_cuda(n, seg, w, sums_.get(), g.stream);
    sums_host_.resize(static_cast<size_t>(n_sums));
    PL_CUDA_CHECK(
        cudaMemcpyAsync(sums_host_.data(), sums_.get(), sizeof(double) * n_sums, cudaMemcpyDeviceToHost, g.stream));
    PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
    beta_ = host.peer_table_beta(sums_host_.data(), n_sums, host.expert_comm());
    ternary_codes_packed_cuda(n, w, beta_, packed_.get(), g.stream);
  }

  void download(CudaContext& g, Model& host) const override {
    if (!ternary()) return;
    std::vector<uint8_t> packed(static_cast<size_t>(packed_.n));
    PL_CUDA_CHECK(cudaMemcpyAsync(packed.data(), packed_.get(), packed.size(), cudaMemcpyDeviceToHost, g.stream));
    PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
    std::vector<int8_t> codes(static_cast<size_t>(g.layout.at(b_.peer_table).numel));
    unpack_ternary(packed.data(), static_cast<int64_t>(codes.size()), codes.data());
    host.set_peer_table_ternary(block_, codes.data(), beta_);
  }

  Retrieved retrieved() const override {
    if (layer_->tokens <= 0) return {};
    const PeerLayerShape& m = layer_->max_shape();
    return {layer_->ids, layer_->tokens * m.heads * m.k};
  }

 private:
  // The layer's shape at M tokens; momentum 1 (see the top of this file).
  static PeerLayerShape shape(const CudaContext& g, int64_t M) {
    PeerLayerShape ps = g.host.peer_shape(M);
    ps.bn_momentum = 1.f;
    return ps;
  }
  // The layer's parameter views (device), BatchNorm statistics as given.
  PeerLayerParams<float> params(const CudaContext& g, float* mean, float* var) const {
    PeerLayerParams<float> p;
    p.w_q = g.P(b_.peer_wq);
    p.bn_gamma = g.P(b_.peer_bn_gamma);
    p.bn_beta = g.P(b_.peer_bn_beta);
    p.bn_running_mean = mean;
    p.bn_running_var = var;
    p.sub_keys1 = g.P(b_.peer_keys1);
    p.sub_keys2 = g.P(b_.peer_keys2);
    p.table = g.P(b_.peer_table);
    if (ternary()) p.table_copy = PeerTableCuda{packed_.get(), beta_};
    return p;
  }
  bool ternary() const { return packed_.n > 0; }  // model.peer_ternary
  // The table the experts read: the ternary copy under model.peer_ternary, else the latent rows.
  PeerTableCuda expert_table(const CudaContext& g) const {
    return ternary() ? PeerTableCuda{packed_.get(), beta_} : PeerTableCuda{g.P(b_.peer_table)};
  }

  const BlockParams& b_;
  const int64_t d_, block_;  // model width, block index
  std::unique_ptr<PeerLayerCuda> layer_;
  std::unique_ptr<ShardedPeerExpertsCuda> shard_;  // sharded tables only
  DevBuf<float> rstd_, mean_, var_;
  // model.peer_ternary: the table's forward copy (this rank's rows, 2-bit packed) and its β; the
  // segment sums of Σ|W| on the device and on the host (refresh()).
  DevBuf<uint8_t> packed_;
  DevBuf<double> sums_;
  std::vector<double> sums_host_;
  float beta_ = 0;
};

}  // namespace

std::unique_ptr<CudaModule> make_peer_cuda(CudaContext& g, const CudaModuleBuild& b) {
  return std::make_unique<PeerCuda>(g, b);
}

}  // namespace peerless
