// Package proc reads what the daemons need of a process from /proc: its
// start time, which with the PID names a process across PID reuse, and
// whether it still runs.
package proc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// StartTime returns the process's start time in clock ticks since boot
// (field 22 of /proc/<pid>/stat).
func StartTime(pid int) (uint64, error) {
	st, _, err := stat(pid)
	return st, err
}

// Alive reports whether the process pid that started at startTime still
// runs: not gone, not a zombie, and not another process that reused the
// PID.
func Alive(pid int, startTime uint64) (bool, error) {
	st, state, err := stat(pid)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return st == startTime && state != "Z" && state != "X", nil
}

func stat(pid int) (startTime uint64, state string, err error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, "", err
	}
	return parseStat(data)
}

// parseStat returns the start time and state of a /proc/<pid>/stat line.
func parseStat(data []byte) (startTime uint64, state string, err error) {
	// The command name is in parentheses and may hold spaces and ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, "", errors.New("malformed stat: no ')'")
	}
	fields := strings.Fields(string(data[i+1:]))
	// fields[0] is field 3 (state); the start time is field 22.
	if len(fields) < 20 {
		return 0, "", fmt.Errorf("malformed stat: %d fields after the command name", len(fields))
	}
	startTime, err = strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return 0, "", fmt.Errorf("malformed stat start time: %w", err)
	}
	return startTime, fields[0], nil
}
