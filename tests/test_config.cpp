// Config loading: unknown keys, wrong types and out-of-range values are reported together with
// the key, the value and the allowed range; overrides; the effective config round-trips.
#include <gtest/gtest.h>

#include "launch/run_config.h"
#include "runtime/config.h"
#include "runtime/error.h"

using namespace peerless;

namespace {

std::string config_error(const std::string& text, std::vector<std::string> overrides = {}) {
  try {
    RunConfig cfg;
    ConfigSchema schema;
    cfg.bind(schema);
    std::vector<std::string> errors;
    schema.load_toml_string(text, "test.toml", errors);
    for (const auto& o : overrides) schema.apply_override(o, errors);
    schema.check_ranges(errors);
    throw_if_errors(errors, "invalid config test.toml");
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::config);
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Config, UnknownKeyIsNamed) {
  const std::string msg = config_error("[optim]\nlearning_rate = 0.1\n");
  EXPECT_NE(msg.find("unknown key 'optim.learning_rate'"), std::string::npos) << msg;
}

TEST(Config, OutOfRangeNamesKeyValueAndRange) {
  const std::string msg = config_error("[optim]\nlr = -0.5\n");
  EXPECT_NE(msg.find("'optim.lr' = -0.5"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[0, 10]"), std::string::npos) << msg;
}

TEST(Config, AllProblemsReportedAtOnce) {
  const std::string msg =
      config_error("[model]\nd_modle = 3\nn_layers = 0\ngate_form = \"fancy\"\n[train]\nmicro_batch = \"big\"\n");
  EXPECT_NE(msg.find("4 problems"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.d_modle"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.n_layers"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"fancy\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("train.micro_batch"), std::string::npos) << msg;
}

TEST(Config, SyntaxErrorHasLine) {
  const std::string msg = config_error("[model]\nd_model = = 3\n");
  EXPECT_NE(msg.find("test.toml:2"), std::string::npos) << msg;
}

TEST(Config, OverridesApplyAndAreChecked) {
  RunConfig cfg = load_run_config("", {"optim.lr=0.01", "model.gate_form=paper", "run.name=abc"});
  EXPECT_DOUBLE_EQ(cfg.optim.lr, 0.01);
  EXPECT_EQ(cfg.model.gate_form, "paper");
  EXPECT_EQ(cfg.run.name, "abc");
  EXPECT_THROW(load_run_config("", {"optim.lr=fast"}), Error);
  EXPECT_THROW(load_run_config("", {"optim.nope=1"}), Error);
  EXPECT_THROW(load_run_config("", {"model.d_model=0"}), Error);
}

TEST(Config, MissingFileIsAnError) {
  try {
    load_run_config("/nonexistent/peerless.toml", {});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/peerless.toml"), std::string::npos);
  }
}

TEST(Config, EffectiveConfigRoundTrips) {
  std::string text;
  RunConfig cfg = load_run_config("", {"optim.lr=0.0123", "train.sample_prompt=a \"quoted\" prompt"}, &text);
  RunConfig again = parse_run_config_text(text, "effective");
  ConfigSchema s1, s2;
  cfg.bind(s1);
  again.bind(s2);
  EXPECT_EQ(s1.to_toml(), s2.to_toml());
  EXPECT_DOUBLE_EQ(again.optim.lr, 0.0123);
  EXPECT_EQ(again.train.sample_prompt, "a \"quoted\" prompt");
}
