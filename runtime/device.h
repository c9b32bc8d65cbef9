// Where a buffer lives and where an op runs. Every op has a CPU reference; CUDA launchers sit beside
// them (model/ops/<op>.cu) and are selected by this enum, never by #ifdef at call sites.
#pragma once

namespace peerless {

enum class Device { cpu, cuda };

inline const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

// True when this binary was built with the CUDA backend and a GPU is visible.
bool cuda_available();

}  // namespace peerless
