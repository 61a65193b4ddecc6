//! What the Kustomize engine refuses while building, in kustomize's words where it has them.
//! The builder adds the kustomization file (`RenderError::Kustomize`).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KustomizeError {
    #[error(
        "may not add resource with an already registered id: {id} (from {first} and {second})"
    )]
    DuplicateId {
        id: String,
        first: String,
        second: String,
    },
    #[error("{kind} {name} already exists; use behavior merge or replace")]
    GeneratedExists { kind: String, name: String },
    #[error(
        "behavior {behavior} needs an existing {kind} named {name} from the resources, found none"
    )]
    NothingToMerge {
        behavior: &'static str,
        kind: String,
        name: String,
    },
    #[error("cannot compute a name hash for kind {kind}")]
    Unhashable { kind: String },
    #[error("var {name} is defined twice")]
    VarDefinedTwice { name: String },
    #[error("var {name}: no {kind} named {target} among the resources")]
    VarUnmatched {
        name: String,
        kind: String,
        target: String,
    },
    #[error("var {name}: several objects match its objref")]
    VarAmbiguous { name: String },
    #[error("var {name}: field {path} not found in {id}")]
    VarFieldMissing {
        name: String,
        path: String,
        id: String,
    },
    #[error("fields: {path} names a version without a kind")]
    VersionWithoutKind { path: String },
    #[error("image {spec:?} names no image")]
    NoImage { spec: String },
    #[error("a delimiter needs a text field")]
    DelimiterNeedsText,
    /// The value is not quoted: it may come from a Secret.
    #[error("the replacement's text does not decode as {want}, the type of the field it replaces")]
    ReplacementType { want: &'static str },
}
