// Numbers for people: byte sizes, counts with thousands separators, durations.
#pragma once

#include <cstdint>
#include <string>

namespace peerless {

std::string human_bytes(double bytes);  // "1.50 GiB"
std::string human_count(int64_t n);     // "1,048,576"
std::string human_duration(double s);   // "45s", "3m07s", "2h05m"

}  // namespace peerless
