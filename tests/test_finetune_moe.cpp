// MoE options of instruction tuning (BASELINES §7; keys finetune.freeze, finetune.aux_losses): a
// frozen router or frozen experts keep their values (and ternary codes) bit for bit through AdamW
// steps while the rest trains, dropping the auxiliary losses zeroes them (and so changes the
// objective), and bad values are config errors naming the key.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "model/data_parallel.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "parallel/comm.h"
#include "runtime/error.h"
#include "tests/model_test_util.h"

using namespace peerless;
using namespace peerless::test;

namespace {

ModelConfig tiny_moe(const std::string& channel, const std::string& freeze) {
  ModelConfig c;
  c.vocab_size = 13;
  c.d_model = 8;
  c.n_layers = 2;
  c.intermediate = 12;
  c.channel_mixer = channel;
  c.moe_experts = 4;
  c.sigma_moe_experts = 4;
  c.sigma_moe_topk = 2;
  c.sigma_moe_group = 4;
  c.lora.freeze = freeze;
  return c;
}

// Trains 6 AdamW steps; returns, per parameter, whether its values changed.
std::vector<bool> train_and_compare(Model& m, std::vector<int8_t>& codes_before, std::vector<int8_t>& codes_after) {
  std::vector<float> params(m.layout().total()), grads(params.size());
  m.init_params(params.data(), 3);
  m.refresh_ternary(params.data());
  const std::vector<float> before = params;
  codes_before = m.codes();
  auto comm = make_single_comm();
  DataParallel dp(m, *comm, false, 1 << 20);
  OptimConfig o;
  o.lr = 1e-2;
  o.weight_decay = 0;
  AdamW adam(o, m.layout(), dp.owned());
  const Batch batch(13, 5, 2, 8);
  for (int step = 1; step <= 6; ++step) {
    std::fill(grads.begin(), grads.end(), 0.f);
    ForwardContext ctx;
    m.forward(params.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, ctx);
    m.backward(params.data(), ctx, 1.f / 16, grads.data());
    adam.step(params.data(), grads.data(), step, o.lr);
    dp.refresh_and_gather(m, params.data());
  }
  codes_after = m.codes();
  std::vector<bool> changed;
  for (const ParamInfo& p : m.layout().entries())
    changed.push_back(std::memcmp(before.data() + p.offset, params.data() + p.offset, sizeof(float) * p.numel) != 0);
  return changed;
}

}  // namespace

TEST(FinetuneMoe, FrozenRouterOrExpertsKeepTheirValues) {
  for (const char* channel : {"moe", "sigma_moe"})
    for (const char* freeze : {"router", "experts", "router,experts"}) {
      Model m(tiny_moe(channel, freeze));
      ASSERT_TRUE(m.has_frozen());
      std::vector<int8_t> c0, c1;
      const std::vector<bool> changed = train_and_compare(m, c0, c1);
      int64_t frozen = 0, trained = 0;
      for (size_t i = 0; i < changed.size(); ++i) {
        const ParamInfo& p = m.layout().entries()[i];
        const bool is_router = p.name.find("/router/") != std::string::npos;
        const bool is_expert = p.name.find("/experts/") != std::string::npos;
        const std::string f = freeze;
        const bool want_frozen = (is_router && f.find("router") != std::string::npos) ||
                                 (is_expert && f.find("experts") != std::string::npos);
        EXPECT_EQ(m.trainable(static_cast<int>(i)), !want_frozen) << channel << " " << freeze << " " << p.name;
        if (want_frozen) {
          ++frozen;
          EXPECT_FALSE(changed[i]) << channel << " freeze " << freeze << ": " << p.name << " moved";
          if (p.kind == ParamKind::ternary_weight)
            EXPECT_EQ(0, std::memcmp(c0.data() + p.offset, c1.data() + p.offset, static_cast<size_t>(p.numel)))
                << p.name << " codes moved";
        } else if (is_router || is_expert || p.name.find("mixer/i_proj/weight") != std::string::npos) {
          trained += changed[i];
        }
      }
      EXPECT_GT(frozen, 0) << channel << " " << freeze;
      EXPECT_GT(trained, 0) << channel << " " << freeze << ": nothing trained";
    }
}

TEST(FinetuneMoe, DroppedAuxLossesChangeTheObjective) {
  for (const char* channel : {"moe", "sigma_moe"}) {
    ModelConfig keep = tiny_moe(channel, ""), drop = keep;
    drop.lora.aux_losses = "drop";
    Model mk(keep), md(drop);
    std::vector<float> params(mk.layout().total());
    mk.init_params(params.data(), 3);
    mk.refresh_ternary(params.data());
    md.refresh_ternary(params.data());
    const Batch batch(13, 5, 2, 8);
    ForwardContext ck, cd;
    const double lk = mk.forward(params.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, ck);
    const double ld = md.forward(params.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, cd);
    EXPECT_EQ(lk, ld) << channel << ": the cross-entropy does not depend on the auxiliary losses";
    EXPECT_NE(mk.aux_loss(ck), 0.0) << channel;
    EXPECT_EQ(md.aux_loss(cd), 0.0) << channel;
    EXPECT_NE(lk + mk.aux_loss(ck), ld + md.aux_loss(cd)) << channel << ": the training objective is unchanged";
  }
}

TEST(FinetuneMoe, ConfigErrorsNameTheKey) {
  std::vector<std::string> errors;
  tiny_moe("moe", "routers").validate(errors);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find("finetune.freeze = \"routers\""), std::string::npos) << errors[0];
  errors.clear();
  ModelConfig glu = tiny_moe("glu", "router");
  glu.validate(errors);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find("needs a mixture of experts"), std::string::npos) << errors[0];
}
