//go:build !linux

package runner

import "os"

func openProcSelf() *os.File { return nil }

func releaseStartupPages(*os.File) {}
