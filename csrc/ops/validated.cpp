// See validated.h.
#include "ops/validated.h"

#include <array>
#include <mutex>
#include <optional>

namespace torchslim {
namespace {

constexpr size_t kMaxTensors = 3;
constexpr size_t kEntries = 64;  // structures in use at once (layers x directions), round-robin

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Seen {
  std::optional<WeakImpl> impl;
  int64_t version = 0;
  const void* data = nullptr;
  int64_t numel = -1;
};

struct Entry {
  std::array<Seen, kMaxTensors> seen;
  size_t count = 0;
  int64_t tag = 0;
  bool used = false;
};

std::mutex g_mutex;
std::array<Entry, kEntries> g_entries;
size_t g_next = 0;

bool cacheable(const at::Tensor& t) { return t.defined() && !t.is_inference(); }

bool same(const Seen& s, const at::Tensor& t) {
  return s.impl.has_value() && !s.impl->expired() && s.impl->_unsafe_get_target() == t.unsafeGetTensorImpl() &&
         s.version == t._version() && s.data == t.const_data_ptr() && s.numel == t.numel();
}

}  // namespace

bool known_valid(std::initializer_list<const at::Tensor*> tensors, int64_t tag) {
  if (tensors.size() > kMaxTensors) return false;
  for (const at::Tensor* t : tensors) {
    if (!cacheable(*t)) return false;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  for (const Entry& e : g_entries) {
    if (!e.used || e.tag != tag || e.count != tensors.size()) continue;
    size_t i = 0;
    bool match = true;
    for (const at::Tensor* t : tensors) match = match && same(e.seen[i++], *t);
    if (match) return true;
  }
  return false;
}

void remember_valid(std::initializer_list<const at::Tensor*> tensors, int64_t tag) {
  if (tensors.size() > kMaxTensors) return;
  for (const at::Tensor* t : tensors) {
    if (!cacheable(*t)) return;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  Entry& e = g_entries[g_next];
  g_next = (g_next + 1) % kEntries;
  size_t i = 0;
  for (const at::Tensor* t : tensors) {
    Seen& s = e.seen[i++];
    s.impl.emplace(t->getIntrusivePtr());
    s.version = t->_version();
    s.data = t->const_data_ptr();
    s.numel = t->numel();
  }
  for (; i < kMaxTensors; ++i) e.seen[i] = Seen{};
  e.count = tensors.size();
  e.tag = tag;
  e.used = true;
}

}  // namespace torchslim
