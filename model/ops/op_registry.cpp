// The table behind op_registry.h: every op of the model, the header that declares it and the
// backends that implement it.
#include "model/ops/op_registry.h"

#include <array>

namespace peerless {
namespace {

constexpr std::array kOps = {
    OpInfo{"gemm", "gemm.h", true, true},
    OpInfo{"rmsnorm", "rmsnorm.h", true, true},
    OpInfo{"act_quant", "quant.h", true, true},
    OpInfo{"rmsnorm_act_quant", "norm_quant.h", true, true},
    OpInfo{"weight_quant", "quant.h", true, true},
    OpInfo{"ternary_int8_matmul", "bitlinear.h", true, true},
    OpInfo{"bitlinear", "bitlinear.h", true, true},
    OpInfo{"embedding", "embedding.h", true, true},
    OpInfo{"lower_bounds", "mlgru.h", true, true},
    OpInfo{"mlgru_scan", "mlgru.h", true, true},
    OpInfo{"output_gate", "mlgru.h", true, true},
    OpInfo{"glu", "glu.h", true, true},
    OpInfo{"cross_entropy", "cross_entropy.h", true, true},
    OpInfo{"peer_retrieval", "peer_retrieval.h", true, true},
    OpInfo{"peer_experts", "peer_experts.h", true, true},
    OpInfo{"peer_layer", "peer_layer.h", true, true},
    OpInfo{"pkm_values", "pkm_values.h", true, true},
    OpInfo{"qsparse_topk", "qsparse.h", true, true},
    OpInfo{"qsparse_block", "qsparse.h", true, true},
    OpInfo{"adamw_ternary", "adamw.h", true, true},
    OpInfo{"fixed_point", "fixed_point.h", true, true},
    OpInfo{"ternary_pack", "ternary_pack.h", true, true},  // CPU reference: model/ternary_pack.h
    OpInfo{"rope", "attention.h", true, true},
    OpInfo{"attention", "attention.h", true, true},
};

}  // namespace

std::span<const OpInfo> op_registry() { return kOps; }

const OpInfo* find_op(std::string_view name) {
  for (const OpInfo& op : kOps)
    if (op.name == name) return &op;
  return nullptr;
}

}  // namespace peerless
