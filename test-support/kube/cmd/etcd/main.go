// Command etcd is etcd's own server entry point, built from Go modules at the
// version kube-apiserver itself depends on, so tests need no prebuilt binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
