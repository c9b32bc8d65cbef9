// The model file (launch/model_file.h): save → load is exact (latent weights, codes, β), datasets
// carry their real shapes, a flipped data byte anywhere is a clear error naming the dataset, a bad
// β is refused, and a format-version-1 file (flat datasets, no checksums) still loads.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <vector>

#include "launch/model_file.h"
#include "runtime/error.h"
#include "runtime/h5.h"
#include "runtime/rng.h"
#include "test_util.h"

using namespace peerless;

namespace {

const char* kConfig = R"([model]
vocab_size = 11
d_model = 8
n_layers = 2
intermediate = 12
peer_blocks = "1"
peer_n_sub = 4
peer_heads = 2
peer_topk = 2
peer_key_dim = 4
)";

struct Saved {
  test::TempDir dir;
  std::string path;
  LoadedModel original;
};

// A model with random latent weights and their ternary copies, saved to a temporary file.
std::unique_ptr<Saved> save_random() {
  auto s = std::make_unique<Saved>();
  s->path = (s->dir.path / "model.h5").string();
  LoadedModel& m = s->original;
  m.config = parse_run_config_text(kConfig, "test");
  m.model = std::make_unique<Model>(m.config.model);
  m.params.assign(m.model->layout().total(), 0.f);
  m.model->init_params(m.params.data(), 3);
  Rng rng(5);
  for (const auto& p : m.model->layout().entries())
    for (int64_t i = 0; i < p.numel; ++i) m.params[p.offset + i] += static_cast<float>(0.01 * rng.normal());
  m.model->refresh_ternary(m.params.data());
  save_model_file(s->path, *m.model, m.params.data(), kConfig, 17, 1234);
  return s;
}

// Byte offset in the file of a contiguous dataset's first element.
haddr_t data_offset(const std::string& path, const std::string& dataset) {
  h5::Handle file = h5::open_file(path);
  h5::Handle ds = h5::open_dataset(file, dataset);
  return H5Dget_offset(ds);
}

void flip_byte(const std::string& path, haddr_t at) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x10);
  f.seekp(static_cast<std::streamoff>(at));
  f.write(&c, 1);
}

std::string load_error(const std::string& path) {
  try {
    load_model_file(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(ModelFile, RoundTripIsExactAndShaped) {
  auto s = save_random();
  const LoadedModel back = load_model_file(s->path);
  EXPECT_EQ(back.format_version, kModelFileVersion);
  EXPECT_EQ(back.step, 17);
  EXPECT_EQ(back.tokens, 1234);
  ASSERT_EQ(back.params.size(), s->original.params.size());
  EXPECT_EQ(0, std::memcmp(back.params.data(), s->original.params.data(), back.params.size() * sizeof(float)));
  EXPECT_EQ(back.model->codes(), s->original.model->codes());
  EXPECT_EQ(back.model->betas(), s->original.model->betas());
  // Every latent tensor is stored with its real shape, for h5py users.
  h5::Handle file = h5::open_file(s->path);
  for (const auto& p : back.model->layout().entries())
    EXPECT_EQ(h5::dataset_shape(file, "model/" + p.name).dims, p.shape) << p.name;
}

TEST(ModelFile, FlippedBytesAreCaughtInEveryKindOfDataset) {
  auto probe = save_random();
  const auto& entries = probe->original.model->layout().entries();
  std::vector<std::string> targets;
  for (const auto& p : entries) {
    targets.push_back("model/" + p.name);
    if (p.kind == ParamKind::ternary_weight) targets.push_back("ternary/" + p.name + "/codes");
  }
  for (const std::string& t : targets) {
    auto s = save_random();
    flip_byte(s->path, data_offset(s->path, t));
    const std::string err = load_error(s->path);
    EXPECT_NE(err.find("/" + t + " is corrupt"), std::string::npos) << t << ": " << err;
  }
}

TEST(ModelFile, BadBetaIsRefused) {
  auto s = save_random();
  std::string name;
  for (const auto& p : s->original.model->layout().entries())
    if (p.kind == ParamKind::ternary_weight) name = p.name;
  {
    h5::Handle file = h5::open_file(s->path, h5::Access::read_write);
    h5::Handle g = h5::open_group(file, "ternary/" + name);
    H5Adelete(g, "beta");
    h5::write_attr(g, "beta", -1.0);
  }
  EXPECT_NE(load_error(s->path).find("beta = -1"), std::string::npos);
}

TEST(ModelFile, VersionOneFlatFilesStillLoad) {
  auto s = save_random();
  // Rewrite as format version 1: flat datasets, no sha256 attributes.
  const std::string v1 = (s->dir.path / "v1.h5").string();
  {
    const LoadedModel& m = s->original;
    h5::Handle file = h5::create_file(v1);
    h5::write_attr(file, "format", "peerless-model");
    h5::write_attr(file, "format_version", int64_t{1});
    h5::write_attr(file, "step", int64_t{17});
    h5::write_attr(file, "tokens", int64_t{1234});
    h5::write_text(file, "config", kConfig);
    const auto& entries = m.model->layout().entries();
    for (size_t i = 0; i < entries.size(); ++i) {
      const ParamInfo& p = entries[i];
      const size_t slash = p.name.rfind('/');
      const bool nested = slash != std::string::npos;
      h5::Handle g = h5::ensure_groups(file, nested ? "model/" + p.name.substr(0, slash) : "model");
      h5::write_1d(g, nested ? p.name.substr(slash + 1) : p.name, h5::Dtype::f32, m.params.data() + p.offset, p.numel);
      if (p.kind != ParamKind::ternary_weight) continue;
      h5::Handle t = h5::ensure_groups(file, "ternary/" + p.name);
      const auto packed = pack_ternary(m.model->weight_codes(static_cast<int>(i)), p.numel);
      h5::write_1d(t, "codes", h5::Dtype::u8, packed.data(), static_cast<int64_t>(packed.size()));
      h5::write_attr(t, "beta", static_cast<double>(m.model->betas()[i]));
    }
  }
  const LoadedModel back = load_model_file(v1);
  EXPECT_EQ(back.format_version, 1);
  EXPECT_EQ(0, std::memcmp(back.params.data(), s->original.params.data(), back.params.size() * sizeof(float)));
  EXPECT_EQ(back.model->codes(), s->original.model->codes());
  EXPECT_EQ(back.model->betas(), s->original.model->betas());
}

TEST(ModelFile, MissingAndForeignFilesAreClearErrors) {
  test::TempDir dir;
  EXPECT_NE(load_error((dir.path / "absent.h5").string()).find("does not exist"), std::string::npos);
  const std::string junk = (dir.path / "junk.h5").string();
  std::ofstream(junk) << "not an hdf5 file";
  EXPECT_NE(load_error(junk).find("is not an HDF5 file"), std::string::npos);
}
