// Command cp copies files into a directory: the entrypoint of the Velero
// plugin image the cluster mode builds (`cp /plugins/NAME /target/.`), as
// the plugin's own image does with busybox's cp.
package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: cp SOURCE... DIRECTORY")
		os.Exit(2)
	}
	target := os.Args[len(os.Args)-1]
	for _, source := range os.Args[1 : len(os.Args)-1] {
		dest := target
		if info, err := os.Stat(target); (err == nil && info.IsDir()) || strings.HasSuffix(target, "/.") {
			dest = filepath.Join(target, filepath.Base(source))
		}
		if err := copyFile(source, dest); err != nil {
			fmt.Fprintln(os.Stderr, "cp:", err)
			os.Exit(1)
		}
	}
}

func copyFile(source, dest string) error {
	in, err := os.Open(source)
	if err != nil {
		return err
	}
	defer in.Close()
	info, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dest, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, info.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
