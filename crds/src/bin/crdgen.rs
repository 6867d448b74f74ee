//! Prints the FineTuneJob CustomResourceDefinition as YAML (`make crds` writes it to
//! `crds/finetunejob.yaml`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    print!("{}", finetune_api::v1alpha1::crd_yaml()?);
    Ok(())
}
