#include "core/checks.h"

#include <atomic>
#include <cstdlib>
#include <sstream>

namespace moe_swap {

namespace {
std::atomic<bool>& debug_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("MOE_SWAP_DEBUG");
    return env != nullptr && env[0] != '\0' && std::string(env) != "0";
  }()};
  return flag;
}
}  // namespace

bool debug_enabled() { return debug_flag().load(std::memory_order_relaxed); }

void set_debug(bool enabled) { debug_flag().store(enabled, std::memory_order_relaxed); }

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

}  // namespace moe_swap
