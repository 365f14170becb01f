// Runs calls of the runtime's kernels (src/nmsparse/runtime/csrc/kernels.cpp) and of the mask
// kernels (src/nmsparse/csrc/masks.cpp), both compiled in with it, on arrays read from files, and
// writes each output to a file: how tests/test_kernels_emulated.py checks the builds for another
// architecture (NEON) under an emulator, where the Python process cannot load the libraries. One
// call per line of the case file:
//   nm_mm    XT LDX CODES VALS ROWS J JC N M BITS BATCH OUT LDO BIAS|- RELU THREADS
//   block_mm XT LDX COLS KSTART CHUNKS VALS ROWS KEPT BLOCK BATCH OUT LDO BIAS|- RELU THREADS
//   topk4    SRC OUTER WIDTH INNER K ABSOLUTE OUT THREADS
//   decay    GRAD WEIGHT KEEP DECAY COUNT OUT THREADS
//   gemv     X OUT ROWS THREADS COUNT KIND ARG... (a batch-1 plan of nms_gemv: COUNT arguments after the
//            kind, each a number or @FILE, replaced by the address of that file's data)
//   q_gemm   KIND CODES|- Q SCALES ROWS COLS N M JC BITS QBITS GROUP X T OUT BIAS|- RELU THREADS
// (upper case: a raw little-endian array file, or a number). Exits non-zero on a malformed line.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

typedef int64_t i64;

extern "C" {
void nms_block_mm(const float* xt, i64 ldx, const int32_t* cols, const int32_t* kstart, i64 chunks, const float* vals,
                  i64 rows, i64 kept, i64 block, i64 batch, float* out, i64 ldo, const float* bias, int relu,
                  int threads);
void nms_nm_mm(const float* xt, i64 ldx, const uint8_t* codes, const float* vals, i64 rows, i64 J, i64 jc, int n,
               int m, int bits, i64 batch, float* out, i64 ldo, const float* bias, int relu, const int32_t* colmap,
               int threads);
void nms_mask_topk4(const float* src, uint32_t* dst, int64_t outer, int64_t width, int64_t inner, int k, int absolute,
                    int threads);
void nms_mask_decay_into(float* g, const float* w, const float* keep, float decay, int64_t n, int threads);
void nms_gemv(const i64* plan, const float* x, float* out, int threads);
int nms_q_gemm(int kind, const uint8_t* codes, const uint8_t* q, const uint16_t* scales, i64 rows, i64 cols, int n, int m,
               i64 jc, int bits, int qbits, i64 group, const float* x, i64 T, float* out, const float* bias, int relu,
               int threads);
}

static std::vector<char> read_all(const std::string& path) {
  std::vector<char> data;
  if (path == "-") return data;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(3);
  }
  std::fseek(f, 0, SEEK_END);
  data.resize(std::ftell(f) + 64);  // slack: vector loads may read a few bytes past a short array's end
  std::fseek(f, 0, SEEK_SET);
  if (std::fread(data.data(), 1, data.size() - 64, f) != data.size() - 64) std::exit(3);
  std::fclose(f);
  return data;
}

static void write_all(const std::string& path, const float* p, i64 count) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(p, sizeof(float), count, f) != (size_t)count) std::exit(4);
  std::fclose(f);
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  FILE* cases = std::fopen(argv[1], "r");
  if (!cases) return 2;
  char kind[16], xt_p[512], a_p[512], b_p[512], out_p[512], bias_p[512];
  while (std::fscanf(cases, "%15s", kind) == 1) {
    if (!std::strcmp(kind, "nm_mm")) {
      long long ldx, rows, J, jc, n, m, bits, batch, ldo, relu, threads;
      if (std::fscanf(cases, "%511s %lld %511s %511s %lld %lld %lld %lld %lld %lld %lld %511s %lld %511s %lld %lld",
                      xt_p, &ldx, a_p, b_p, &rows, &J, &jc, &n, &m, &bits, &batch, out_p, &ldo, bias_p, &relu,
                      &threads) != 16)
        return 5;
      auto xt = read_all(xt_p), codes = read_all(a_p), vals = read_all(b_p), bias = read_all(bias_p);
      std::vector<float> out(rows * ldo);
      nms_nm_mm((const float*)xt.data(), ldx, (const uint8_t*)codes.data(), (const float*)vals.data(), rows, J, jc,
                (int)n, (int)m, (int)bits, batch, out.data(), ldo, bias.empty() ? nullptr : (const float*)bias.data(),
                (int)relu, nullptr, (int)threads);
      write_all(out_p, out.data(), rows * ldo);
    } else if (!std::strcmp(kind, "block_mm")) {
      char ks_p[512];
      long long ldx, chunks, rows, kept, block, batch, ldo, relu, threads;
      if (std::fscanf(cases, "%511s %lld %511s %511s %lld %511s %lld %lld %lld %lld %511s %lld %511s %lld %lld", xt_p,
                      &ldx, a_p, ks_p, &chunks, b_p, &rows, &kept, &block, &batch, out_p, &ldo, bias_p, &relu,
                      &threads) != 15)
        return 5;
      auto xt = read_all(xt_p), cols = read_all(a_p), kstart = read_all(ks_p), vals = read_all(b_p),
           bias = read_all(bias_p);
      std::vector<float> out(rows * block * ldo);
      nms_block_mm((const float*)xt.data(), ldx, (const int32_t*)cols.data(), (const int32_t*)kstart.data(), chunks,
                   (const float*)vals.data(), rows, kept, block, batch, out.data(), ldo,
                   bias.empty() ? nullptr : (const float*)bias.data(), (int)relu, (int)threads);
      write_all(out_p, out.data(), rows * block * ldo);
    } else if (!std::strcmp(kind, "topk4")) {
      long long outer, width, inner, k, absolute, threads;
      if (std::fscanf(cases, "%511s %lld %lld %lld %lld %lld %511s %lld", a_p, &outer, &width, &inner, &k, &absolute,
                      out_p, &threads) != 8)
        return 5;
      auto src = read_all(a_p);
      std::vector<float> out(outer * width * inner);
      nms_mask_topk4((const float*)src.data(), (uint32_t*)out.data(), outer, width, inner, (int)k, (int)absolute,
                     (int)threads);
      write_all(out_p, out.data(), outer * width * inner);
    } else if (!std::strcmp(kind, "decay")) {
      char keep_p[512];
      float decay;
      long long count, threads;
      if (std::fscanf(cases, "%511s %511s %511s %f %lld %511s %lld", a_p, b_p, keep_p, &decay, &count, out_p,
                      &threads) != 7)
        return 5;
      auto grad = read_all(a_p), weight = read_all(b_p), keep = read_all(keep_p);
      nms_mask_decay_into((float*)grad.data(), (const float*)weight.data(), (const float*)keep.data(), decay, count,
                          (int)threads);
      write_all(out_p, (const float*)grad.data(), count);
    } else if (!std::strcmp(kind, "gemv")) {
      long long rows, threads, count, k;
      if (std::fscanf(cases, "%511s %511s %lld %lld %lld %lld", xt_p, out_p, &rows, &threads, &count, &k) != 6)
        return 5;
      auto x = read_all(xt_p);
      std::vector<std::vector<char>> files;
      files.reserve(count);
      std::vector<i64> plan{(i64)k};
      for (long long i = 0; i < count; ++i) {
        char arg[512];
        if (std::fscanf(cases, "%511s", arg) != 1) return 5;
        if (arg[0] == '@') {
          files.push_back(read_all(arg + 1));
          plan.push_back((i64)(intptr_t)files.back().data());
        } else {
          plan.push_back((i64)std::strtoll(arg, nullptr, 10));
        }
      }
      std::vector<float> out(rows);
      nms_gemv(plan.data(), (const float*)x.data(), out.data(), (int)threads);
      write_all(out_p, out.data(), rows);
    } else if (!std::strcmp(kind, "q_gemm")) {
      char s_p[512];
      long long k, rows, cols, n, m, jc, bits, qbits, group, T, relu, threads;
      if (std::fscanf(cases, "%lld %511s %511s %511s %lld %lld %lld %lld %lld %lld %lld %lld %511s %lld %511s %511s "
                      "%lld %lld", &k, a_p, b_p, s_p, &rows, &cols, &n, &m, &jc, &bits, &qbits, &group, xt_p, &T,
                      out_p, bias_p, &relu, &threads) != 18)
        return 5;
      auto codes = read_all(a_p), q = read_all(b_p), scales = read_all(s_p), x = read_all(xt_p),
           bias = read_all(bias_p);
      std::vector<float> out(T * rows);
      if (!nms_q_gemm((int)k, codes.empty() ? nullptr : (const uint8_t*)codes.data(), (const uint8_t*)q.data(),
                      (const uint16_t*)scales.data(), rows, cols, (int)n, (int)m, jc, (int)bits, (int)qbits, group,
                      (const float*)x.data(), T, out.data(), bias.empty() ? nullptr : (const float*)bias.data(),
                      (int)relu, (int)threads))
        return 6;
      write_all(out_p, out.data(), T * rows);
    } else {
      return 5;
    }
  }
  std::fclose(cases);
  return 0;
}
