//go:build tools

// Istio's echo server and client, the Gateway API mesh conformance suite's echo-advanced app,
// built static from the istio.io/istio module pinned in go.mod (see scripts/conformance).
package echo

import (
	_ "istio.io/istio/pkg/test/echo/cmd/client"
	_ "istio.io/istio/pkg/test/echo/cmd/server"
)
