// Keys, ranges and help of every config field, and whole-config validation.
#include "launch/run_config.h"

#include "model/module.h"

#include <limits>

#include "model/module.h"
#include "runtime/error.h"

namespace peerless {

namespace {
constexpr int64_t kBig = int64_t{1} << 40;
}

void RunConfig::bind(ConfigSchema& s) {
  s.add_string("run.name", &run.name, "run directory name (runs/<name>/)");
  s.add_string("run.out_dir", &run.out_dir, "parent directory of run directories");
  s.add_int("run.seed", &run.seed, 0, kBig, "seed for initialization and data order");
  s.add_int("run.threads", &run.threads, 0, 1024, "CPU threads (0 = all cores)");
  s.add_choice("run.device", &run.device, {"cpu", "cuda"}, "where training runs (cuda: one GPU; model/cuda_model.h lists what it trains)");
  s.add_choice("run.activations", &run.activations, {"bf16", "fp32"},
               "run.device = cuda: storage of the activations the backward keeps (bf16 halves their memory; "
               "fp32 keeps the forward equal to the CPU's)");
  s.add_choice("run.recompute", &run.recompute, {"none", "mlgru", "glu", "all"},
               "run.device = cuda: activations the backward recomputes instead of keeping, bit for bit (mlgru: the "
               "MLGRU's g product, h and output, 4d + 2d·A bytes per token per block, for two d x d products, the "
               "scan and the gate kernel again; glu: the GLU / SwiGLU [a | u], 2I·A bytes, for the gate product "
               "again; all: both)");
  s.add_choice("run.forward_gemm", &run.forward_gemm, {"cublaslt", "fused", "wgmma"},
               "run.device = cuda: kernel of the ternary BitLinear forward products (cublaslt = int8 IMMA, then a "
               "separate scaling pass; fused = one int8 kernel with the scaling in its epilogue; wgmma = the same on "
               "Hopper's warpgroup tensor cores, fused elsewhere; same results)");

  s.add_int("model.vocab_size", &model.vocab_size, 0, 1 << 24, "vocabulary size (0 = from the data file)");
  s.add_int("model.d_model", &model.d_model, 1, 65536, "model width d");
  s.add_int("model.n_layers", &model.n_layers, 1, 1024, "number of blocks L");
  s.add_int("model.intermediate", &model.intermediate, 0, 1 << 20, "GLU width I (0 = 256*ceil(int(8d/3)/256))");
  s.add_float("model.norm_eps", &model.norm_eps, 1e-12, 1e-2, "RMSNorm epsilon");
  s.add_float("model.init_std", &model.init_std, 1e-6, 1.0, "std of the normal initializations");
  s.add_choice("model.gate_form", &model.gate_form, {"code", "paper"},
               "MLGRU output gate: code = RMSNorm(g)*h*sigmoid(h), paper = sigmoid(g)*h");
  s.add_choice("model.quant", &model.quant, {"ternary", "none"},
               "projections: ternary BitLinear, or full precision (ablation, gradient checks)");
  s.add_choice("model.glu_activation", &model.glu_activation, {"silu", "relu2"}, "channel-mixer activation");
  s.add_choice("model.token_mixer", &model.token_mixer, module_kinds(ModuleRole::token_mixer),
               "token mixer of every block (model/module.h)");
  s.add_choice("model.channel_mixer", &model.channel_mixer, module_kinds(ModuleRole::channel_mixer),
               "channel mixer of every block not in model.peer_blocks (\"peer\": every block)");
  s.add_int("model.n_heads", &model.n_heads, 1, 65536, "attention query heads H");
  s.add_int("model.n_kv_heads", &model.n_kv_heads, 0, 65536, "attention KV heads H_kv, dividing n_heads (0 = n_heads)");
  s.add_int("model.head_dim", &model.head_dim, 0, 65536, "attention head width d_h, even (0 = d_model / n_heads)");
  s.add_float("model.rope_theta", &model.rope_theta, 1, 1e9, "RoPE base theta (10000; 500000 for 2B4T-like models)");
  s.add_choice("model.rope_layout", &model.rope_layout, {"adjacent", "rotate_half"},
               "RoPE pairs: adjacent (2j, 2j+1: Meta, llama2.c) or rotate_half (j, j+d_h/2: HF, GGUF bitnet)");
  s.add_int("model.context_length", &model.context_length, 1, 1 << 24,
            "the sequence length T attention's FLOP accounting assumes (decoders size the KV cache by what they decode)");
  s.add_choice("model.head", &model.head, {"bitlinear", "linear", "tied"},
               "LM head after the final norm: bitlinear (SPEC), linear (fp32 weight) or tied (the embedding)");
  s.add_choice("model.param", &model.param, {"sp", "mup"},
               "parameterisation: sp, or mup (hidden matrices init/sqrt(m), Adam lr/m; head output x1/m; "
               "m = d_model / model.mup_base_width; ../shared/SWEEPS.md §3)");
  s.add_int("model.mup_base_width", &model.mup_base_width, 1, 65536, "mup: the base width d_base of m = d_model / d_base");
  s.add_string("model.peer_blocks", &model.peer_blocks,
               "blocks whose GLU is replaced by a PEER layer: comma-separated indices (\"\" = none)");
  s.add_int("model.peer_n_sub", &model.peer_n_sub, 1, 46340, "PEER sub-keys per table n (N = n^2 experts)");
  s.add_int("model.peer_heads", &model.peer_heads, 1, 1024, "PEER retrieval heads h");
  s.add_int("model.peer_topk", &model.peer_topk, 1, 46340, "PEER experts per head k");
  s.add_int("model.peer_key_dim", &model.peer_key_dim, 2, 65536, "PEER query/key width per head d_k (even)");
  s.add_choice("model.peer_activation", &model.peer_activation, {"relu", "gelu"}, "PEER expert activation");
  s.add_bool("model.peer_query_bn", &model.peer_query_bn, "BatchNorm on the PEER query (paper default)");
  s.add_bool("model.peer_shared_keys", &model.peer_shared_keys, "PEER heads share the sub-key tables C, C'");
  s.add_bool("model.peer_ternary", &model.peer_ternary,
             "PEER experts compute with ternary forward copies t*beta of the table (one beta per table, STE)");
  s.add_choice("model.peer_gemm", &model.peer_gemm, {"tf32x3", "fp32", "tf32", "bf16"},
               "GPU PEER GEMMs (query projection, sub-key scores, their backward): tf32x3 (fp32-accurate 3xTF32), "
               "fp32 (SGEMM), tf32 (one TF32 pass, inputs rounded to 10 mantissa bits; ~3x faster) or bf16 (bf16 "
               "copies of the inputs, 8 significant bits; ~2x tf32's GEMM rate); the CPU computes fp32 whatever "
               "this says");
  s.add_int("model.moe_experts", &model.moe_experts, 1, 1 << 16, "channel_mixer = moe: experts E");
  s.add_int("model.moe_topk", &model.moe_topk, 1, 1 << 16, "moe: experts per token k (<= E)");
  s.add_int("model.moe_width", &model.moe_width, 0, 1 << 20, "moe: expert SwiGLU width I_e (0 = ceil(GLU width / k))");
  s.add_choice("model.moe_gate", &model.moe_gate, {"topk_softmax", "softmax_topk"},
               "moe: gates softmax over the chosen scores, or the full softmax at the chosen (Switch)");
  s.add_float("model.moe_capacity_factor", &model.moe_capacity_factor, 0, 1e6,
              "moe: capacity ceil(CF*T*k/E) per expert, overflow dropped (0 = dropless)");
  s.add_float("model.moe_aux_loss", &model.moe_aux_loss, 0, 1e3, "moe: load-balancing loss weight alpha");
  s.add_float("model.moe_z_loss", &model.moe_z_loss, 0, 1e3, "moe: router z-loss weight c_z");
  s.add_int("model.sigma_moe_experts", &model.sigma_moe_experts, 1, 1 << 16, "channel_mixer = sigma_moe: experts N_E");
  s.add_int("model.sigma_moe_topk", &model.sigma_moe_topk, 1, 1 << 16, "sigma_moe: experts per token K (<= N_E)");
  s.add_int("model.sigma_moe_group", &model.sigma_moe_group, 1, 1 << 20, "sigma_moe: expert width G");
  s.add_float("model.sigma_moe_entropy", &model.sigma_moe_entropy, 0, 1e3,
              "sigma_moe: weight gamma of the entropy regularizer gamma*sum p log p");
  s.add_float("model.sigma_moe_dropout", &model.sigma_moe_dropout, 0, 0.999999,
              "sigma_moe: expert dropout delta (training only)");
  s.add_int("model.pkm_n_sub", &model.pkm_n_sub, 1, 46340, "PKM sub-keys per table n (n^2 value rows)");
  s.add_int("model.pkm_heads", &model.pkm_heads, 1, 1024, "PKM retrieval heads h");
  s.add_int("model.pkm_topk", &model.pkm_topk, 1, 46340, "PKM value rows per head k (<= model.pkm_n_sub)");
  s.add_int("model.pkm_key_dim", &model.pkm_key_dim, 2, 65536, "PKM query/key width per head d_k (even)");
  s.add_bool("model.pkm_shared_keys", &model.pkm_shared_keys, "PKM heads share the sub-key tables C, C'");
  s.add_float("model.qsparse", &model.qsparse, 0, 0.999999, "Q-Sparse sparsity of BitLinear inputs (0 = off)");
  s.add_int("model.qsparse_block", &model.qsparse_block, 0, 1 << 20,
            "Q-Sparse block size M for N:M sparsity (0 = per-token top-K)");

  s.add_string("data.path", &data.path, "token file made by `peerless prepare`");
  s.add_int("data.seq_len", &data.seq_len, 1, 1 << 20, "tokens per training window T");

  s.add_int("train.micro_batch", &train.micro_batch, 1, 1 << 20, "sequences per micro-batch");
  s.add_int("train.accum_steps", &train.accum_steps, 1, 1 << 16, "micro-batches per optimizer step");
  s.add_int("train.max_steps", &train.max_steps, 1, kBig, "optimizer steps");
  s.add_float("train.time_limit_minutes", &train.time_limit_minutes, 0, 1e7, "stop after this long (0 = none)");
  s.add_int("train.log_every", &train.log_every, 1, kBig, "steps between metrics lines");
  s.add_int("train.eval_every", &train.eval_every, 0, kBig, "steps between validation evals (0 = end only)");
  s.add_int("train.eval_windows", &train.eval_windows, 0, kBig, "validation windows per eval (0 = all)");
  s.add_int("train.final_eval_windows", &train.final_eval_windows, 0, kBig, "validation windows at the end (0 = all)");
  s.add_int("train.sample_tokens", &train.sample_tokens, 0, 1 << 20, "tokens sampled at the end (0 = none)");
  s.add_string("train.sample_prompt", &train.sample_prompt, "prompt of the final sample");
  s.add_float("train.sample_temperature", &train.sample_temperature, 0, 100, "temperature of the final sample");
  s.add_string("train.branch_steps", &train.branch_steps,
               "steps with a permanent checkpoint (step_<n>/ with a KEEP file, never rotated): \"800,1600\" or [800, 1600]");
  s.add_string("train.init_from", &train.init_from,
               "checkpoint directory a fresh run starts from (state and step; model, optim, data, batch and seed "
               "must match; own checkpoints take priority on --resume)");
  s.add_int("train.stop_step", &train.stop_step, 0, kBig,
            "end the run after this step, schedule still that of train.max_steps (0 = at train.max_steps)");

  s.add_choice("parallel.backend", &parallel.backend, {"auto", "mpi", "nccl", "single"},
               "communication backend (auto = NCCL on GPUs, MPI under mpirun, else single process)");
  s.add_bool("parallel.zero1", &parallel.zero1, "ZeRO-1: shard AdamW state over data-parallel ranks");
  s.add_int("parallel.bucket_mb", &parallel.bucket_mb, 1, 1 << 16, "gradient exchange bucket size in MiB");
  s.add_bool("parallel.overlap", &parallel.overlap,
             "run.device = \"cuda\": reduce gradient buckets while the backward runs (false: after it)");
  s.add_float("parallel.timeout_s", &parallel.timeout_s, 0, 1e6, "abort when a collective takes longer (0 = never)");
  s.add_int("parallel.expert_parallel", &parallel.expert_parallel, 0, 1 << 20,
            "ranks per expert-parallel group (0 = all ranks)");
  s.add_int("parallel.peer_round_tokens", &parallel.peer_round_tokens, 0, int64_t{1} << 30,
            "run.device = \"cuda\", sharded PEER / PKM tables: tokens per rank in one round of the expert exchange, "
            "bounding its owner-side buffers to expert_parallel x this many tokens (0 = automatic: one round up to "
            "8 shards, else ceil(8 x tokens / expert_parallel))");
  s.add_choice("parallel.deterministic", &parallel.deterministic, {"auto", "on", "off"},
               "exact, split-independent sums: the same bits for any world size (auto = on)");

  s.add_choice("finetune.mode", &model.lora.mode, {"full", "lora"},
               "full: every parameter trains; lora: only the adapters (the base frozen, ../shared/BASELINES.md §6)");
  s.add_int("finetune.lora_rank", &model.lora.rank, 0, 65536, "adapter rank r (0 = no adapters)");
  s.add_float("finetune.lora_alpha", &model.lora.alpha, 0, 1e6, "adapter scale alpha: y += (alpha/r) B A x");
  s.add_string("finetune.lora_targets", &model.lora.targets,
               "weights that get adapters: \"all\" (every projection of the blocks) or comma-separated substrings "
               "of their names, e.g. \"i_proj,o_proj\"");
  s.add_float("finetune.lora_dropout", &model.lora.dropout, 0, 0.999999,
              "dropout p on the adapters' input x (training only; kept entries scaled by 1/(1-p))");
  s.add_bool("finetune.rslora", &model.lora.rslora, "scale alpha/sqrt(r) instead of alpha/r (rsLoRA)");
  s.add_string("finetune.freeze", &model.lora.freeze,
               "MoE parts that do not train: \"\" (none), router, experts, or router,experts");
  s.add_choice("finetune.aux_losses", &model.lora.aux_losses, {"keep", "drop"},
               "MoE balance, z and entropy losses while tuning: keep (BASELINES §7) or drop");
  s.add_string("finetune.base", &finetune.base,
               "model file or run directory the run starts from (\"\" = random initialization)");
  s.add_string("finetune.base_sha256", &finetune.base_sha256,
               "sha256 of the base model file; the trainer records it (a different file is an error)");
  s.add_float("optim.lr", &optim.lr, 0, 10, "peak learning rate");
  s.add_float("optim.lr_min", &optim.lr_min, 0, 10, "final learning rate of the decay");
  s.add_int("optim.warmup_steps", &optim.warmup_steps, 0, kBig, "linear warmup steps");
  s.add_choice("optim.schedule", &optim.schedule, {"cosine", "linear", "constant", "wsd"},
               "decay after warmup (wsd: constant, then a cooldown to 0 over the last optim.decay_fraction)");
  s.add_float("optim.decay_fraction", &optim.decay_fraction, 1e-9, 1,
              "wsd: fraction of train.max_steps spent cooling down (the last round(fraction * max_steps) steps)");
  s.add_choice("optim.decay_shape", &optim.decay_shape, {"1-sqrt", "linear"},
               "wsd cooldown shape: 1-sqrt (f = 1 - sqrt((n - n0)/n_decay)) or linear");
  s.add_float("optim.beta1", &optim.beta1, 0, 0.999999, "AdamW beta1");
  s.add_float("optim.beta2", &optim.beta2, 0, 0.999999999, "AdamW beta2");
  s.add_float("optim.eps", &optim.eps, 1e-30, 1, "AdamW epsilon");
  s.add_float("optim.weight_decay", &optim.weight_decay, 0, 10, "decoupled weight decay");
  s.add_bool("optim.decay_embedding", &optim.decay_embedding, "apply weight decay to the embedding");
  s.add_bool("optim.decay_gains", &optim.decay_gains, "apply weight decay to RMSNorm gains");
  s.add_bool("optim.decay_lower_bounds", &optim.decay_lower_bounds, "apply weight decay to MLGRU lower bounds");
  s.add_float("optim.grad_clip", &optim.grad_clip, 0, 1e9, "max global gradient L2 norm (0 = off)");
  s.add_float("optim.table_lr_scale", &optim.table_lr_scale, 0, 1e6,
              "learning-rate multiplier for the PEER expert tables and sub-keys");
  s.add_choice("optim.table_optimizer", &optim.table_optimizer, {"adamw", "lazy_adam"},
               "PEER expert tables: dense AdamW, or lazy Adam (only rows retrieved this step are updated)");

  s.add_int("checkpoint.every_steps", &checkpoint.every_steps, 0, kBig, "steps between checkpoints (0 = off)");
  s.add_float("checkpoint.every_minutes", &checkpoint.every_minutes, 0, 1e7, "minutes between checkpoints (0 = off)");
  s.add_int("checkpoint.keep", &checkpoint.keep, 1, 1 << 20, "complete checkpoints kept; older ones are deleted");
  s.add_string("checkpoint.dir", &checkpoint.dir, "checkpoint directory (\"\" = <run.out_dir>/<run.name>/checkpoints)");
}

// LoRA on run.device = "cuda": what the GPU model cannot run yet (adapter dropout, adapters on the
// kinds without an adapter hook) is refused by CudaModel::check_supported, which the planner calls too.
static void check_finetune(const RunConfig& cfg, std::vector<std::string>& errors) {
  // The GPU model (model/cuda_model.cu) has no per-tensor learning rates or head multiplier yet.
  if (cfg.model.param == "mup" && cfg.run.device == "cuda")
    errors.push_back("key 'model.param' = \"mup\" with run.device = \"cuda\": μP runs on the CPU path only (allowed: "
                     "model.param = \"sp\", or run.device = \"cpu\")");
}

std::vector<int64_t> TrainSection::branch_step_list() const {
  return parse_int_list("train.branch_steps", branch_steps, "step", 1, max_steps, nullptr);
}

static RunConfig finish(RunConfig& cfg, ConfigSchema& schema, std::vector<std::string>& errors,
                        const std::string& context, std::string* toml_text) {
  schema.check_ranges(errors);
  // Relations between keys only mean something once every key is valid on its own.
  if (errors.empty()) {
    cfg.model.validate(errors);
    cfg.optim.validate(errors);
  }
  check_finetune(cfg, errors);
  parse_int_list("train.branch_steps", cfg.train.branch_steps, "step", 1, cfg.train.max_steps, &errors);
  if (cfg.train.stop_step > cfg.train.max_steps)
    errors.push_back(cat("key 'train.stop_step' = ", cfg.train.stop_step, " is past train.max_steps = ",
                         cfg.train.max_steps, " (allowed: 0 or a step in [1, train.max_steps])"));
  if (cfg.run.name.empty() || cfg.run.name.find('/') != std::string::npos)
    errors.push_back(cat("key 'run.name' = \"", cfg.run.name, "\" must be a non-empty name without '/'"));
  if (cfg.data.path.empty()) errors.push_back("key 'data.path' is empty (allowed: a token file made by `peerless prepare`)");
  throw_if_errors(errors, context);
  if (toml_text) *toml_text = schema.to_toml();
  return cfg;
}

bool deterministic_on(const RunConfig& cfg) {
  return cfg.parallel.deterministic == "on" || (cfg.parallel.deterministic == "auto" && cfg.run.device == "cpu");
}

RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides, std::string* toml_text) {
  RunConfig cfg;
  ConfigSchema schema;
  cfg.bind(schema);
  std::vector<std::string> errors;
  if (!path.empty()) schema.load_toml_file(path, errors);
  for (const auto& o : overrides) schema.apply_override(o, errors);
  return finish(cfg, schema, errors, cat("invalid config ", path.empty() ? "(defaults)" : path), toml_text);
}

RunConfig parse_run_config_text(const std::string& text, const std::string& origin) {
  RunConfig cfg;
  ConfigSchema schema;
  cfg.bind(schema);
  std::vector<std::string> errors;
  schema.load_toml_string(text, origin, errors);
  return finish(cfg, schema, errors, cat("invalid config ", origin), nullptr);
}

std::string run_config_toml(RunConfig cfg) {
  ConfigSchema schema;
  cfg.bind(schema);
  return schema.to_toml();
}

}  // namespace peerless
