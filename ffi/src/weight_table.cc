// See weight_table.h.
#include "weight_table.h"

#include <algorithm>
#include <cmath>

namespace pigjax {

namespace {

// log(1 / (u + eps)) at angle theta; see query.h for the formula.
double log_weight_at(double theta, int K, int L, double eps) {
  const double p = 1.0 - theta / 3.14159265358979323846;
  const double P = std::pow(p, K);
  const double lg = std::log1p(-P);  // -inf at P == 1
  const double a = std::exp(L * lg);
  const double b = L * P * std::exp((L - 1) * lg);
  double u = 1.0 - a - b;
  if (!(u > 0.0)) u = 0.0;
  if (u > 1.0) u = 1.0;
  return -std::log(u + eps);
}

}  // namespace

// The formula costs six transcendental calls per (sampled key, query head), a third of a query;
// it depends on the angle alone, so tabulate it and interpolate linearly. The table is over
// cos(theta) in [-1, 1] rather than theta, which saves the acos per (key, head). Intervals where
// interpolation misses the formula by more than kMaxTableError at the midpoint or quarter points
// (steep spots, e.g. near cos = +-1 where d theta / d cos is unbounded, for small K or L) evaluate
// the formula instead, so the table never costs accuracy.
LogWeightTable::LogWeightTable(int K, int L, double eps)
    : K_(K), L_(L), eps_(eps), f_(kIntervals + 1), exact_(kIntervals) {
  const double h = 2.0 / kIntervals;
  auto at = [&](double c) { return log_weight_at(std::acos(std::min(1.0, std::max(-1.0, c))), K, L, eps); };
  for (int i = 0; i <= kIntervals; ++i) f_[i] = at(-1.0 + i * h);
  for (int i = 0; i < kIntervals; ++i) {
    bool ok = true;
    for (double t : {0.25, 0.5, 0.75}) {
      const double interp = f_[i] + t * (f_[i + 1] - f_[i]);
      ok = ok && std::abs(interp - at(-1.0 + (i + t) * h)) <= kMaxTableError;
    }
    exact_[i] = !ok;
  }
}

double LogWeightTable::operator()(double dot, double qnorm, double knorm) const {
  double c = 0.0;
  if (qnorm > 0.0 && knorm > 0.0) c = dot / (qnorm * knorm);
  if (c > 1.0) c = 1.0;
  if (c < -1.0) c = -1.0;
  if (std::isnan(c)) c = 0.0;
  const double x = (c + 1.0) * (kIntervals / 2.0);
  int i = static_cast<int>(x);
  if (i >= kIntervals) i = kIntervals - 1;
  if (exact_[i]) return log_weight_at(std::acos(c), K_, L_, eps_);
  const double t = x - i;
  return f_[i] + t * (f_[i + 1] - f_[i]);
}

}  // namespace pigjax
