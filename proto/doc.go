// Package proto will hold the guest agent API (vmm-task) and its generated Go code.
package proto
