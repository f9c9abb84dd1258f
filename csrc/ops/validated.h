// A cache of index tensors that passed a full range check, so that ops taking a cached
// sparse structure (the masked linear structure ops, the fused MLP op) check every index
// once per structure instead of once per call.
//
// An entry holds weak references to the tensors (their TensorImpls stay allocated, so an
// address cannot be reused by another tensor while the entry lives) with the version,
// data pointer and size each had when checked, and a tag (e.g. the extent the indices
// were checked against). Any in-place write bumps the version and any new storage changes
// the data pointer, so an edited or different tensor is checked again. Inference tensors
// have no version counter and are never cached.
//
// Size: one entry per (tensors, tag) that passed, however many there are (a model with
// hundreds of sparse layers is checked once per structure, not once per call once it
// outgrows a fixed table). Entries whose tensors were freed are dropped whenever the table
// has doubled since the last sweep, so it stays proportional to the structures alive.
//
// Edits that bypass the version counter (.numpy(), .data) are not seen here: the kernels
// clamp what they read (kernels/cpu/masked_linear.h, "Safe reads"), so such an edit gives
// wrong numbers, never an out-of-bounds access.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>

namespace torchslim {

// Whether these tensors, in their current state, passed a check recorded with this tag.
bool known_valid(std::initializer_list<const at::Tensor*> tensors, int64_t tag);
// Records that these tensors passed the check for this tag.
void remember_valid(std::initializer_list<const at::Tensor*> tensors, int64_t tag);
// Counts one full pass over a structure's indices (a cache miss); read by the debug op
// torch.ops.torchslim_debug.index_checks() so that tests can see how often checks run.
void count_index_check();

}  // namespace torchslim
