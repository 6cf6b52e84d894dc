package main

import (
	"fmt"
	"math"
	"os"
	"strconv"

	"github.com/kuasar-go/kuasar-go/hack/bench/stats"
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// cdfLine is the empirical CDF of ms as a step line.
func cdfLine(ms []float64) (*plotter.Line, error) {
	x, y := stats.CDF(ms)
	pts := make(plotter.XYs, 0, 2*len(x))
	prev := 0.0
	for i := range x {
		pts = append(pts, plotter.XY{X: x[i], Y: prev}, plotter.XY{X: x[i], Y: y[i]})
		prev = y[i]
	}
	return plotter.NewLine(pts)
}

// plotStartup draws one CDF panel per mode (serial, parallel), one line
// per series in each.
func (r *results) plotStartup(path string, c config) error {
	var panels []*plot.Plot
	col := colors(r.series)
	for _, mode := range []string{"serial", "parallel"} {
		n := 0
		for _, s := range r.series {
			n += len(r.byMode(s.Name, mode))
		}
		if n == 0 {
			continue
		}
		p := plot.New()
		p.Title.Text = "Pod start latency, serial"
		if mode == "parallel" {
			p.Title.Text = fmt.Sprintf("Pod start latency, %d at once", c.parallel)
		}
		p.X.Label.Text = "RunPodSandbox → first log line (ms)"
		p.Y.Label.Text = "fraction of pods"
		// Headroom above 1 keeps the legend off the curves (a line of the
		// legend takes about 0.07).
		p.X.Min, p.Y.Min, p.Y.Max = 0, 0, 1.2+0.07*float64(max(0, len(r.series)-2))
		p.X.Tick.Marker = plainTicks{}
		p.Y.Tick.Marker = plot.ConstantTicks([]plot.Tick{
			{Value: 0, Label: "0"}, {Value: 0.25, Label: "0.25"}, {Value: 0.5, Label: "0.5"},
			{Value: 0.75, Label: "0.75"}, {Value: 1, Label: "1"}})
		p.Add(plotter.NewGrid())
		for _, s := range r.series {
			ms := totals(r.byMode(s.Name, mode))
			if len(ms) == 0 {
				continue
			}
			l, err := cdfLine(ms)
			if err != nil {
				return err
			}
			l.Color = col[s.Name]
			l.Width = vg.Points(1.5)
			p.Add(l)
			p.Legend.Add(fmt.Sprintf("%s (p50 %.0f ms)", s.Label(), stats.Percentile(ms, 50)), l)
		}
		p.Legend.Top, p.Legend.Left = true, true
		p.Legend.XOffs, p.Legend.YOffs = vg.Points(8), vg.Points(-4)
		panels = append(panels, p)
	}
	if len(panels) == 0 {
		return nil
	}
	img := vgimg.New(vg.Points(float64(420*len(panels))), vg.Points(320))
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 1, Cols: len(panels),
		PadX: vg.Points(16), PadTop: vg.Points(6), PadBottom: vg.Points(6), PadLeft: vg.Points(6), PadRight: vg.Points(10)}
	canvases := plot.Align([][]*plot.Plot{panels}, tiles, dc)
	for i, p := range panels {
		p.Draw(canvases[0][i])
	}
	return savePNG(img, path)
}

// plotMemory draws summed PSS against the number of pods.
func (r *results) plotMemory(path string) error {
	p := plot.New()
	p.Title.Text = "Memory of the pod management processes"
	p.X.Label.Text = "pods running"
	p.Y.Label.Text = "summed PSS (MiB)"
	p.X.Min, p.Y.Min = 0, 0
	p.Add(plotter.NewGrid())
	col := colors(r.series)
	for _, s := range r.series {
		var pts plotter.XYs
		for _, m := range r.memory {
			if m.Runtime == s.Name {
				pts = append(pts, plotter.XY{X: float64(m.Pods), Y: float64(m.TotalPSS()) / 1024})
			}
		}
		if len(pts) == 0 {
			continue
		}
		l, pt, err := plotter.NewLinePoints(pts)
		if err != nil {
			return err
		}
		l.Color, pt.Color = col[s.Name], col[s.Name]
		l.Width = vg.Points(1.5)
		pt.Shape = draw.CircleGlyph{}
		p.Add(l, pt)
		p.Legend.Add(fmt.Sprintf("%s (%s)", s.Label(), legendWhat[s.Handler]), l, pt)
	}
	p.Legend.Top, p.Legend.Left = true, true
	p.Legend.XOffs, p.Legend.YOffs = vg.Points(8), vg.Points(-6)
	var maxY float64
	for _, m := range r.memory {
		maxY = max(maxY, float64(m.TotalPSS())/1024)
	}
	p.Y.Max = maxY * (1.2 + 0.08*float64(max(0, len(r.series)-2))) // headroom for the legend
	var ticks []plot.Tick
	for _, n := range r.podCounts() {
		ticks = append(ticks, plot.Tick{Value: float64(n), Label: strconv.Itoa(n)})
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	p.Y.Tick.Marker = plainTicks{}
	img := vgimg.New(vg.Points(520), vg.Points(340))
	p.Draw(draw.New(img))
	return savePNG(img, path)
}

// legendWhat says in a few words what the memory of a handler counts.
var legendWhat = map[string]string{
	kuasar: "runc-sandboxer + holders",
	shim:   "shims + pause",
	wasm:   "wasm-sandboxer + holders",
	quark:  "quark-sandboxer + runsc + waiters",
}

// plainTicks are about five round ticks (1, 2 or 5 times a power of ten)
// labelled without trailing zeros, with unlabelled minor ticks between.
type plainTicks struct{}

func (plainTicks) Ticks(min, max float64) []plot.Tick {
	if !(max > min) {
		return plot.DefaultTicks{}.Ticks(min, max)
	}
	raw := (max - min) / 5
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step := mag
	for _, m := range []float64{2, 5, 10} {
		if step >= raw {
			break
		}
		step = m * mag
	}
	var ts []plot.Tick
	minor := step / 2
	for v := math.Ceil(min/minor) * minor; v <= max+minor/1e6; v += minor {
		t := plot.Tick{Value: v}
		if k := v / step; math.Abs(k-math.Round(k)) < 1e-6 {
			t.Label = strconv.FormatFloat(math.Round(v/step)*step, 'f', -1, 64)
		}
		ts = append(ts, t)
	}
	return ts
}

func savePNG(img *vgimg.Canvas, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
