# Sourced by bench/gpu_check.sh and bench/gpu_prebuild.sh: what the GPU correctness pass builds (the
# binary for the command-line GPU tests, and every test binary with gpu-labelled tests).
gpu_targets=(peerless test_ops_cuda test_ops_train_cuda test_fused_cuda test_model_cuda test_peer_cuda
  test_cuda_model_config test_ops_attention_cuda test_qsparse_fused_cuda test_zero1_cuda test_peer_shard_cuda
  test_proj_cuda test_plan_device test_pkm_cuda test_moe_cuda test_lora_cuda test_import_llama_cuda
  test_gemm_fused_cuda bench_gemm_cuda)
