package main

import (
	"encoding/csv"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// replot redraws startup-cdf.png and memory.png in dir from its CSVs.
func replot(dir string) error {
	var r results
	c := config{}
	seen := map[string]bool{}
	addSeries := func(name string) {
		if !seen[name] {
			seen[name] = true
			r.series = append(r.series, seriesOf(name))
		}
	}
	if rows, err := readCSV(filepath.Join(dir, "startup.csv")); err == nil {
		for _, row := range rows {
			s := sample{Runtime: row["runtime"], Mode: row["mode"], PodID: row["pod_id"]}
			addSeries(s.Runtime)
			s.Batch, _ = strconv.Atoi(row["batch"])
			s.Index, _ = strconv.Atoi(row["index"])
			s.Total = msDuration(row["total_ms"])
			r.startup = append(r.startup, s)
			if s.Mode == "parallel" && s.Index+1 > c.parallel {
				c.parallel = s.Index + 1
			}
		}
	} else if !os.IsNotExist(err) {
		return err
	}
	if rows, err := readCSV(filepath.Join(dir, "memory.csv")); err == nil {
		for _, row := range rows {
			m := memRow{Runtime: row["runtime"]}
			addSeries(m.Runtime)
			m.Pods, _ = strconv.Atoi(row["pods"])
			if row["classes"] != "" {
				if m.Classes, err = parseClasses(row["classes"]); err != nil {
					return err
				}
			} else {
				// Written before the classes column: manager and helpers.
				mp, _ := strconv.ParseInt(row["manager_pss_kib"], 10, 64)
				hp, _ := strconv.ParseInt(row["helper_pss_kib"], 10, 64)
				m.Classes = []memClass{{Name: "manager", PSS: mp}, {Name: "helper", PSS: hp}}
			}
			r.memory = append(r.memory, m)
		}
	} else if !os.IsNotExist(err) {
		return err
	}
	if len(r.startup) == 0 && len(r.memory) == 0 {
		return fmt.Errorf("no startup.csv or memory.csv in %s", dir)
	}
	if len(r.startup) > 0 {
		if err := r.plotStartup(filepath.Join(dir, "startup-cdf.png"), c); err != nil {
			return err
		}
	}
	if len(r.memory) > 0 {
		return r.plotMemory(filepath.Join(dir, "memory.png"))
	}
	return nil
}

func msDuration(s string) time.Duration {
	f, _ := strconv.ParseFloat(s, 64)
	return time.Duration(f * float64(time.Millisecond))
}

// readCSV returns the rows of a CSV file with a header as maps.
func readCSV(path string) ([]map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var out []map[string]string
	for i, rec := range recs {
		if i == 0 {
			continue
		}
		m := map[string]string{}
		for j, k := range recs[0] {
			if j < len(rec) {
				m[k] = rec[j]
			}
		}
		out = append(out, m)
	}
	return out, nil
}
