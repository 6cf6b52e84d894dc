package stats

import (
	"math"
	"testing"
)

func TestPercentileNearestRank(t *testing.T) {
	// 1..100 in reverse order: the p-th percentile is p itself.
	var xs []float64
	for i := 100; i >= 1; i-- {
		xs = append(xs, float64(i))
	}
	for _, p := range []float64{1, 50, 90, 99, 100} {
		if got := Percentile(xs, p); got != p {
			t.Errorf("Percentile(1..100, %v) = %v, want %v", p, got, p)
		}
	}
	if got := Percentile(xs, 0); got != 1 {
		t.Errorf("p0 = %v, want the minimum", got)
	}
	// Ten samples: p90 is the 9th, p99 the 10th, p50 the 5th.
	ten := []float64{10, 20, 30, 40, 50, 60, 70, 80, 90, 100}
	for p, want := range map[float64]float64{50: 50, 90: 90, 99: 100, 10: 10, 11: 20} {
		if got := Percentile(ten, p); got != want {
			t.Errorf("Percentile(ten, %v) = %v, want %v", p, got, want)
		}
	}
	if got := Percentile([]float64{7}, 99); got != 7 {
		t.Errorf("one sample: %v", got)
	}
	if !math.IsNaN(Percentile(nil, 50)) {
		t.Error("no samples: want NaN")
	}
	// The input is not reordered.
	in := []float64{3, 1, 2}
	Percentile(in, 50)
	if in[0] != 3 || in[1] != 1 || in[2] != 2 {
		t.Errorf("input modified: %v", in)
	}
}

func TestMedianMean(t *testing.T) {
	if m := Median([]float64{5, 1, 3}); m != 3 {
		t.Errorf("odd median %v", m)
	}
	if m := Median([]float64{4, 1, 3, 2}); m != 2.5 {
		t.Errorf("even median %v", m)
	}
	if m := Mean([]float64{1, 2, 3, 6}); m != 3 {
		t.Errorf("mean %v", m)
	}
	if !math.IsNaN(Median(nil)) || !math.IsNaN(Mean(nil)) {
		t.Error("empty: want NaN")
	}
}

func TestSummarize(t *testing.T) {
	s := Summarize([]float64{4, 2, 8, 6})
	if s.N != 4 || s.Min != 2 || s.Max != 8 || s.Mean != 5 || s.P50 != 4 || s.P90 != 8 || s.P99 != 8 {
		t.Errorf("summary %+v", s)
	}
	e := Summarize(nil)
	if e.N != 0 || !math.IsNaN(e.P50) || !math.IsNaN(e.Min) {
		t.Errorf("empty summary %+v", e)
	}
}

func TestRatio(t *testing.T) {
	if r := Ratio(1, 4); r != 0.25 {
		t.Errorf("ratio %v", r)
	}
	if !math.IsNaN(Ratio(1, 0)) || !math.IsNaN(Ratio(math.NaN(), 1)) {
		t.Error("want NaN")
	}
}

func TestCDF(t *testing.T) {
	x, y := CDF([]float64{30, 10, 20, 40})
	wantX := []float64{10, 20, 30, 40}
	wantY := []float64{0.25, 0.5, 0.75, 1}
	for i := range wantX {
		if x[i] != wantX[i] || y[i] != wantY[i] {
			t.Fatalf("CDF = %v %v", x, y)
		}
	}
	if x, y := CDF(nil); len(x) != 0 || len(y) != 0 {
		t.Error("empty CDF")
	}
}

func TestLinearFit(t *testing.T) {
	x := []float64{1, 5, 10, 20, 50}
	var y []float64
	for _, v := range x {
		y = append(y, 3+2*v)
	}
	b, m, ok := LinearFit(x, y)
	if !ok || math.Abs(b-3) > 1e-9 || math.Abs(m-2) > 1e-9 {
		t.Errorf("fit = %v + %v x (ok %v)", b, m, ok)
	}
	if _, _, ok := LinearFit([]float64{2, 2}, []float64{1, 3}); ok {
		t.Error("one distinct x: want !ok")
	}
	if _, _, ok := LinearFit([]float64{1}, []float64{1}); ok {
		t.Error("one point: want !ok")
	}
}
