// Package stats holds the small amount of statistics the benchmark needs:
// nearest-rank percentiles, summaries, empirical CDFs, medians and a
// least-squares line.
package stats

import (
	"math"
	"sort"
)

// Percentile returns the nearest-rank p-th percentile (0 < p <= 100) of xs:
// the smallest sample such that at least p% of the samples are <= it. It is
// always one of the samples (no interpolation), which is what latency
// reports usually mean by p99. NaN for no samples; p <= 0 gives the minimum.
func Percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := sorted(xs)
	if p <= 0 {
		return s[0]
	}
	if p >= 100 {
		return s[len(s)-1]
	}
	// Nearest rank, 1-based: ceil(p/100 * n). The small epsilon keeps
	// exact products (e.g. 90% of 10 = 9) from rounding up through
	// floating-point error.
	rank := int(math.Ceil(p/100*float64(len(s)) - 1e-9))
	if rank < 1 {
		rank = 1
	}
	return s[rank-1]
}

// Median is the middle sample, or the mean of the two middle samples for an
// even count. NaN for no samples.
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := sorted(xs)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// Mean is the arithmetic mean; NaN for no samples.
func Mean(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	var sum float64
	for _, x := range xs {
		sum += x
	}
	return sum / float64(len(xs))
}

// Summary describes a sample.
type Summary struct {
	N              int
	Min, Max, Mean float64
	P50, P90, P99  float64
}

// Summarize returns the summary of xs (NaN fields when empty).
func Summarize(xs []float64) Summary {
	s := Summary{N: len(xs), Mean: Mean(xs),
		P50: Percentile(xs, 50), P90: Percentile(xs, 90), P99: Percentile(xs, 99),
		Min: math.NaN(), Max: math.NaN()}
	if len(xs) > 0 {
		ss := sorted(xs)
		s.Min, s.Max = ss[0], ss[len(ss)-1]
	}
	return s
}

// Ratio is a/b, NaN when b is zero or either is NaN.
func Ratio(a, b float64) float64 {
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return math.NaN()
	}
	return a / b
}

// CDF returns the empirical distribution function of xs as points: the
// sorted samples and, for the i-th (0-based), the fraction (i+1)/n of
// samples <= it.
func CDF(xs []float64) (x, y []float64) {
	x = sorted(xs)
	y = make([]float64, len(x))
	for i := range x {
		y[i] = float64(i+1) / float64(len(x))
	}
	return x, y
}

// LinearFit returns the least-squares line y = intercept + slope*x through
// the points; ok is false with fewer than two distinct x values.
func LinearFit(x, y []float64) (intercept, slope float64, ok bool) {
	if len(x) != len(y) || len(x) < 2 {
		return 0, 0, false
	}
	mx, my := Mean(x), Mean(y)
	var sxx, sxy float64
	for i := range x {
		dx := x[i] - mx
		sxx += dx * dx
		sxy += dx * (y[i] - my)
	}
	if sxx == 0 {
		return 0, 0, false
	}
	slope = sxy / sxx
	return my - slope*mx, slope, true
}

func sorted(xs []float64) []float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s
}
