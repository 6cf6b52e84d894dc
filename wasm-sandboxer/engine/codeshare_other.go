//go:build !linux

package engine

type codeRegion struct{ start, end uintptr }

func codeRegions() map[codeRegion]bool { return nil }

func shareCode(dir string, before map[codeRegion]bool) {}
