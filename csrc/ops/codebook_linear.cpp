// Glue for the codebook_linear op: placeholder until the op lands.
#include "ops/registration.h"

namespace torchslim {
void define_codebook_linear_ops(torch::Library& m) { (void)m; }
}  // namespace torchslim
