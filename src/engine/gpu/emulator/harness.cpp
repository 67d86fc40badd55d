// Runs one of our CUDA kernels, the .cu source itself, on the CPU through cuda_emu.h. Reads from
// stdin (little-endian u32 words): the kernel's name (length, then bytes), grid x y z, block
// x y z, the buffer count and each buffer (byte length, then bytes), then the 32-bit scalar
// count and the scalars (f32 ones as their bits). Writes every buffer back to stdout, in order.
// Built and driven by src/engine/gpu/emulator.rs in the tests.
#include "cuda_emu.h"

#include "../decode_attention.cu"
#include "../kv_write.cu"
#include "../rope.cu"

#include <functional>
#include <map>
#include <string>

namespace {
uint32_t word() {
  uint32_t w;
  if (std::fread(&w, sizeof w, 1, stdin) != 1) {
    std::fprintf(stderr, "harness: input ends early\n");
    std::exit(2);
  }
  return w;
}

float f32(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

using Kernel = std::function<void(void **, const uint32_t *)>;

// Each kernel by name: how many buffers it takes (in its parameter order), and the call.
#define DECODE(HD)                                                                            \
  {"decode_attention_" #HD,                                                                   \
   {6, [](void **b, const uint32_t *s) {                                                      \
      decode_attention_##HD((const float *)b[0], (const __half *)b[1], (const __half *)b[2], \
                            (const uint32_t *)b[3], (float *)b[4], (float *)b[5], s[0], s[1], \
                            s[2], s[3], s[4], f32(s[5]));                                     \
    }}}

const std::map<std::string, std::pair<size_t, Kernel>> kernels = {
    DECODE(16),
    DECODE(32),
    DECODE(64),
    DECODE(80),
    DECODE(96),
    DECODE(128),
    {"decode_attention_merge",
     {2,
      [](void **b, const uint32_t *s) {
        decode_attention_merge((const float *)b[0], (float *)b[1], s[0], s[1], s[2], s[3]);
      }}},
    {"kv_write_f32",
     {5,
      [](void **b, const uint32_t *s) {
        kv_write_f32((const float *)b[0], (const unsigned int *)b[1], (__half *)b[2],
                     (const float *)b[3], (const float *)b[4], s[0], s[1], s[2], s[3], s[4]);
      }}},
    {"rope_rows_f32",
     {4,
      [](void **b, const uint32_t *s) {
        rope_rows_f32((const float *)b[0], (const float *)b[1], (const float *)b[2],
                      (float *)b[3], s[0], s[1], s[2], s[3]);
      }}},
};
}  // namespace

int main() {
  std::string name(word(), '\0');
  if (!name.empty() && std::fread(name.data(), 1, name.size(), stdin) != name.size()) return 2;
  const dim3 grid{word(), word(), word()}, threads{word(), word(), word()};
  std::vector<std::vector<char>> data(word());
  std::vector<void *> ptrs;
  for (auto &d : data) {
    d.resize(word());
    if (!d.empty() && std::fread(d.data(), 1, d.size(), stdin) != d.size()) return 2;
    // Each buffer in an allocation of its own exact size, so that AddressSanitizer sees every
    // access past its end.
    void *p = std::malloc(d.size() ? d.size() : 1);
    if (!d.empty()) std::memcpy(p, d.data(), d.size());
    ptrs.push_back(d.empty() ? nullptr : p);
  }
  std::vector<uint32_t> scalars(word());
  for (auto &s : scalars) s = word();
  const auto k = kernels.find(name);
  if (k == kernels.end()) {
    std::fprintf(stderr, "harness: no kernel `%s`\n", name.c_str());
    return 2;
  }
  if (k->second.first != data.size()) {
    std::fprintf(stderr, "harness: `%s` takes %zu buffers, got %zu\n", name.c_str(),
                 k->second.first, data.size());
    return 2;
  }
  const Kernel &run = k->second.second;
  emu::launch(grid, threads, [&] { run(ptrs.data(), scalars.data()); });
  for (size_t i = 0; i < data.size(); ++i) {
    if (ptrs[i]) std::fwrite(ptrs[i], 1, data[i].size(), stdout);
    std::free(ptrs[i]);
  }
  return 0;
}
