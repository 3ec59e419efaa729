// The sampling-weight table of a store: log(1 / (u + eps)), MagicPIG's importance weight of a
// sampled key, where u is the probability that LSH samples a key at a given angle to the query
// (formula in query.h). It depends on the angle alone, so each store tabulates it once (over
// cos(angle), 16384 intervals) for its K, L and eps, and the query interpolates instead of
// evaluating six transcendental functions per (sampled key, query head). Pure C++17.
#pragma once

#include <cstdint>
#include <vector>

namespace pigjax {

// -log(u + eps) as a function of the angle between query and key (docs/algorithm.md §2.5-2.6),
// tabulated over cos(angle); see weight_table.cc for how the table stays exact.
// weights(dot, |q|, |k|) is the term the query adds to q.k / sqrt(d) for a sampled key.
class LogWeightTable {
 public:
  static constexpr int kIntervals = 16384;
  static constexpr double kMaxTableError = 1e-7;
  LogWeightTable(int K, int L, double eps);
  double operator()(double dot, double qnorm, double knorm) const;

 private:
  int K_, L_;
  double eps_;
  std::vector<double> f_;        // values at cos(theta) = -1 + 2 i / kIntervals
  std::vector<uint8_t> exact_;   // interval i evaluates the formula instead of interpolating
};

}  // namespace pigjax
