//! Prints the FineTuneJob CustomResourceDefinition as YAML (`make crds` writes it to
//! `crds/finetunejob.yaml`); with `--without-cel`, the variant without CEL rules for API servers
//! older than 1.25 (`crds/finetunejob-pre-1.25.yaml`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let yaml = if std::env::args().any(|a| a == "--without-cel") {
        finetune_api::v1alpha1::crd_yaml_without_cel()?
    } else {
        finetune_api::v1alpha1::crd_yaml()?
    };
    print!("{yaml}");
    Ok(())
}
