// Shared by the plain-C++ kernel interfaces of csrc/ (no torch headers).
#pragma once

namespace l2vf {

// Element type of the floating-point inputs.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Bytes of one element of that type.
constexpr int element_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

}  // namespace l2vf
