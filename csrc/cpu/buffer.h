// Scratch arrays of a call that its code writes in full before reading: left uninitialized, where
// a std::vector would zero-fill them first (an extra pass over every buffer of every call).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>

namespace transfuse::cpu {

template <class T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

}  // namespace transfuse::cpu
