// See validated.h.
#include "ops/validated.h"

#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <functional>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace torchslim {
namespace {

constexpr size_t kMaxTensors = 4;  // (_sparse_codebook_mlp: plan, row_ptr, col_idx, codes)
constexpr size_t kMinSweep = 256;  // table size below which freed entries are left in place

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Key {
  std::array<const c10::TensorImpl*, kMaxTensors> impl{};
  int64_t tag = 0;
  bool operator==(const Key& o) const { return impl == o.impl && tag == o.tag; }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = std::hash<int64_t>()(k.tag);
    for (const c10::TensorImpl* p : k.impl) h = h * 1000003u ^ std::hash<const void*>()(p);
    return h;
  }
};

struct Seen {
  std::optional<WeakImpl> impl;  // (no default constructor of its own)
  int64_t version = 0;
  const void* data = nullptr;
  int64_t numel = -1;
};

struct Entry {
  std::array<Seen, kMaxTensors> seen;
  size_t count = 0;
};

std::mutex g_mutex;
std::unordered_map<Key, Entry, KeyHash> g_entries;
size_t g_sweep_at = kMinSweep;
std::atomic<int64_t> g_checks{0};

bool cacheable(const at::Tensor& t) { return t.defined() && !t.is_inference(); }

bool same(const Seen& s, const at::Tensor& t) {
  return s.impl.has_value() && !s.impl->expired() && s.version == t._version() && s.data == t.const_data_ptr() && s.numel == t.numel();
}

bool make_key(std::initializer_list<const at::Tensor*> tensors, int64_t tag, Key& key) {
  if (tensors.size() > kMaxTensors) return false;
  size_t i = 0;
  for (const at::Tensor* t : tensors) {
    if (!cacheable(*t)) return false;
    key.impl[i++] = t->unsafeGetTensorImpl();
  }
  key.tag = tag;
  return true;
}

// Drops entries any of whose tensors was freed; caller holds g_mutex.
void sweep() {
  for (auto it = g_entries.begin(); it != g_entries.end();) {
    const Entry& e = it->second;
    bool dead = false;
    for (size_t i = 0; i < e.count; ++i) dead = dead || !e.seen[i].impl.has_value() || e.seen[i].impl->expired();
    it = dead ? g_entries.erase(it) : std::next(it);
  }
  g_sweep_at = std::max(kMinSweep, 2 * g_entries.size());
}

}  // namespace

bool known_valid(std::initializer_list<const at::Tensor*> tensors, int64_t tag) {
  Key key;
  if (!make_key(tensors, tag, key)) return false;
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto it = g_entries.find(key);
  if (it == g_entries.end() || it->second.count != tensors.size()) return false;
  size_t i = 0;
  for (const at::Tensor* t : tensors) {
    if (!same(it->second.seen[i++], *t)) return false;
  }
  return true;
}

void remember_valid(std::initializer_list<const at::Tensor*> tensors, int64_t tag) {
  Key key;
  if (!make_key(tensors, tag, key)) return;
  Entry e;
  for (const at::Tensor* t : tensors) {
    Seen& s = e.seen[e.count++];
    s.impl.emplace(t->getIntrusivePtr());
    s.version = t->_version();
    s.data = t->const_data_ptr();
    s.numel = t->numel();
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  g_entries.insert_or_assign(key, std::move(e));
  if (g_entries.size() >= g_sweep_at) sweep();
}

void count_index_check() { g_checks.fetch_add(1, std::memory_order_relaxed); }

namespace {
int64_t index_checks() { return g_checks.load(std::memory_order_relaxed); }
int64_t validated_entries() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<int64_t>(g_entries.size());
}
}  // namespace

// Debug ops for tests, in their own namespace (not part of the torchslim op library):
//   index_checks()       full index checks run so far (cache misses of the structure ops)
//   validated_entries()  structures remembered now (freed ones linger until a sweep)
TORCH_LIBRARY(torchslim_debug, m) {
  m.def("index_checks() -> int", &index_checks);
  m.def("validated_entries() -> int", &validated_entries);
}

}  // namespace torchslim
