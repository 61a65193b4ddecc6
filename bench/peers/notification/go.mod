module edgesync.local/peers/notification

go 1.26

require github.com/fluxcd/notification-controller v1.6.0
replace gopkg.in/yaml.v3 => gopkg.in/yaml.v3 v3.0.1
