// The pinned OCI registry used in tests: `tests/registry/build` compiles
// github.com/distribution/distribution/v3/cmd/registry from this module.

//go:build tools

package tools

import _ "github.com/distribution/distribution/v3/cmd/registry"
