// The Gateway API conformance suite, pinned at the version in go.mod, as a test binary that
// scripts/conformance and cli/tests/conformance.rs build once into the cache and run against
// the one-node cluster with the mesh installed. Flags are the suite's own (--conformance-profiles,
// --supported-features, --namespace-annotations, --report-output, ...).
package conformance_test

import (
	"testing"

	"sigs.k8s.io/gateway-api/conformance"
)

func TestConformance(t *testing.T) {
	conformance.RunConformance(t)
}
