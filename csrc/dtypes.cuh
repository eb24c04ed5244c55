// Shared by the .cu files and bindings.cpp: the element types a launcher accepts.
// Kept free of torch headers so that .cu files compile in seconds (DESIGN.md, "Build").
#pragma once

#include <cstdint>

namespace fastoptim {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace fastoptim
